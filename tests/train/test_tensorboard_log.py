"""--use_tensorboard: the event files hold metrics.json's scalars."""

import pytest

from shardtune.outputs import ownership
from shardtune.config import ConfigError, ShardtuneError, parse_args
from shardtune.train.metrics import TAGS


def test_event_files_hold_the_metrics_scalars(logged_run):
    pytest.importorskip("tensorboard", reason="tensorboard is not installed (pip install 'shardtune[tensorboard]')")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    board = logged_run.output / "tensorboard"
    assert list(board.glob("events.out.tfevents.*"))
    events = EventAccumulator(str(board), size_guidance={"scalars": 0})
    events.Reload()
    data = logged_run.metrics
    expected = {TAGS[key]: (data["train_step"], data[key]) for key in TAGS if key.startswith("train_step_") and key in data}
    expected.update({TAGS[key]: (data["val_step"], data[key]) for key in ("val_epoch_loss", "val_epoch_perplexity")})
    expected.update({TAGS[key]: (data["train_epoch_step"], data[key])
                     for key in ("train_epoch_loss", "train_epoch_mfu", "train_epoch_tokens_per_s")})
    assert {"train/loss", "train/mfu", "train/tflops_per_device", "train/tokens_per_s", "memory/host_rss_gib",
            "eval/loss", "train/epoch_mfu"} <= set(expected)
    assert set(expected) <= set(events.Tags()["scalars"])
    for tag, (steps, values) in expected.items():
        logged = events.Scalars(tag)
        assert [e.step for e in logged] == steps, tag
        assert [e.value for e in logged] == pytest.approx(values, rel=1e-6), tag  # float32 in the file
    assert "tensorboard/" in ownership.owned(logged_run.output)  # a folder of the run's output


def test_tensorboard_options_are_checked_before_work(tiny_model_dir, tmp_path):
    base = ["--model_name", str(tiny_model_dir), "--output_dir", str(tmp_path / "out")]
    with pytest.raises(ConfigError, match="only applies with --use_tensorboard"):
        parse_args([*base, "--tensorboard_dir", str(tmp_path / "tb")])
    from shardtune.preflight import preflight

    data = tmp_path / "rows.json"
    data.write_text('[{"instruction": "a", "input": "", "output": "b"}]')
    common = [*base, "--dataset", "alpaca_dataset", "--alpaca_dataset.data_path", str(data), "--use_tensorboard"]
    with pytest.raises(ShardtuneError, match="inside the path --model_name reads from"):
        preflight(parse_args([*common, "--tensorboard_dir", str(tiny_model_dir / "tb")]).config, 1)
    with pytest.raises(ShardtuneError, match="--output_dir itself"):
        preflight(parse_args([*common, "--tensorboard_dir", str(tmp_path / "out")]).config, 1)
