"""--use_wandb in W&B's offline mode: every wandb_config field reaches the run, and the run's
file holds metrics.json's scalars."""

import json

import pytest

from shardtune.config import ConfigError, parse_args
from shardtune.train.metrics import TAGS


def test_the_offline_run_holds_the_config_fields_and_the_scalars(logged_run, read_wandb_run):
    pytest.importorskip("wandb", reason="wandb is not installed (pip install 'shardtune[wandb]')")
    runs = list(logged_run.wandb_dir.glob("wandb/offline-run-*/run-*.wandb"))
    assert len(runs) == 1, list(logged_run.wandb_dir.rglob("*"))
    records = read_wandb_run(runs[0])
    run = next(r.run for r in records if r.WhichOneof("record_type") == "run")
    assert (run.project, run.entity, run.job_type, run.run_group, run.notes) == (
        "shardtune-tests", "tester", "finetune", "metrics", "offline run of the test suite")
    assert list(run.tags) == ["tiny", "cpu"]
    config = {item.key: json.loads(item.value_json) for item in run.config.update}
    assert config["train_config"]["use_wandb"] is True and config["wandb_config"]["mode"] == "offline"
    history: dict[int, dict] = {}
    for r in records:
        if r.WhichOneof("record_type") == "history":
            items = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item}
            history.setdefault(r.history.step.num, {}).update(items)
    data = logged_run.metrics
    for i, step in enumerate(data["train_step"]):
        for key in ("train_step_loss", "train_step_tokens_per_s", "train_step_tflops", "train_step_mfu",
                    "train_step_host_rss_gib", "train_step_lr"):
            assert history[step][TAGS[key]] == pytest.approx(data[key][i]), (step, key)
    for i, step in enumerate(data["val_step"]):
        assert history[step]["eval/loss"] == pytest.approx(data["val_epoch_loss"][i])
        assert history[step]["train/epoch_mfu"] == pytest.approx(data["train_epoch_mfu"][i])
    summaries = [r.summary for r in records if r.WhichOneof("record_type") == "summary"]
    keys = {i.key or "/".join(i.nested_key) for s in summaries for i in s.update}
    assert "peak_tflops" in keys and "peak_source" in keys


def test_an_unknown_wandb_mode_is_refused(tiny_model_dir):
    with pytest.raises(ConfigError, match="online, offline or disabled"):
        parse_args(["--model_name", str(tiny_model_dir), "--wandb_config.mode", "ofline"])
