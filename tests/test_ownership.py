"""Output directories: shardtune writes only where nothing of the user's is, and removes only its own files."""

from __future__ import annotations

import pytest

from shardtune.config import ShardtuneError
from shardtune.outputs.ownership import MARKER, check_output_dir, commit_files, foreign_entries, owned, record


def _check(path, overwrite=False, **protected):
    return check_output_dir(path, flag="--output_dir", overwrite=overwrite, overwrite_flag="--overwrite_output_dir",
                            protected=protected)


def test_new_empty_and_own_directories_are_accepted(tmp_path):
    assert _check(tmp_path / "new") == []
    (tmp_path / "empty").mkdir()
    assert _check(tmp_path / "empty") == []
    own = tmp_path / "own"
    own.mkdir()
    (own / "metrics.json").write_text("{}")
    (own / "checkpoints").mkdir()
    (own / ".saving-123").mkdir()  # a save interrupted by a crash: shardtune's by its name
    record(own, added=["metrics.json", "checkpoints/"])
    assert owned(own) == {"metrics.json", "checkpoints/"} and _check(own) == []


def test_foreign_files_are_named_and_need_the_flag(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "special_tokens_map.json").write_text("{}")
    (out / "metrics.json").write_text("{}")
    record(out, added=["metrics.json"])
    with pytest.raises(ShardtuneError, match=r"special_tokens_map\.json.*--overwrite_output_dir") as e:
        _check(out)
    assert "metrics.json" not in str(e.value).split("(")[1].split(")")[0]
    assert _check(out, overwrite=True) == ["special_tokens_map.json"]


def test_inputs_are_never_an_output_and_a_file_is_refused(tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    for overwrite in (False, True):
        with pytest.raises(ShardtuneError, match="is the path --model_name reads from"):
            _check(model, overwrite, **{"--model_name": str(model)})
    (tmp_path / "file").write_text("x")
    with pytest.raises(ShardtuneError, match="is a file"):
        _check(tmp_path / "file", True)


def test_an_output_inside_an_input_is_refused_even_with_the_flag(tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    for overwrite in (False, True):
        with pytest.raises(ShardtuneError, match=r"'.*model/out' is inside the path --model_name reads from"):
            _check(model / "out", overwrite, **{"--model_name": str(model)})
    assert _check(tmp_path / "out", **{"--model_name": str(model)}) == []  # beside it is fine


def test_a_damaged_marker_is_an_error_not_an_empty_list(tmp_path):
    (tmp_path / MARKER).write_text("{not json")
    with pytest.raises(ShardtuneError, match="is damaged"):
        owned(tmp_path)


def test_commit_removes_only_stale_files_shardtune_wrote(tmp_path):
    final = tmp_path / "final"
    final.mkdir()
    for name in ("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors", "mine.safetensors"):
        (final / name).write_bytes(b"old " + name.encode())
    record(final, added=["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"])
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    (tmp / "model.safetensors").write_bytes(b"new")
    commit_files(tmp, final, ["*.safetensors"])
    assert sorted(p.name for p in final.iterdir() if p.name != MARKER) == ["mine.safetensors", "model.safetensors"]
    assert (final / "mine.safetensors").read_bytes() == b"old mine.safetensors"
    assert owned(final) == {"model.safetensors"} and foreign_entries(final) == ["mine.safetensors"]


def test_inputs_inside_the_output_and_foreign_whole_folders_are_refused_even_with_the_flag(tmp_path):
    out = tmp_path / "out"
    (out / "merged").mkdir(parents=True)
    record(out, added=["merged/"])
    with pytest.raises(ShardtuneError, match="holds the path --model_name reads from"):
        _check(out, True, **{"--model_name": str(out / "merged")})  # a base model inside its own output
    (out / "checkpoints").mkdir()  # the user's folder, not shardtune's
    with pytest.raises(ShardtuneError, match="holds a folder checkpoints/ that shardtune did not write"):
        check_output_dir(out, flag="--output_dir", overwrite=True, overwrite_flag="--overwrite_output_dir",
                         replaced_whole=["checkpoints/", "merged/"])
    assert check_output_dir(out, flag="--output_dir", overwrite=True, overwrite_flag="--x",
                            replaced_whole=["merged/"]) == ["checkpoints/"]


def test_a_read_only_output_is_refused_before_any_work(tiny_model_dir, tmp_path, tmpfs, shardtune_cli):
    """Root ignores file modes, not a read-only mount: a real one (a tmpfs mounted ro)."""
    import json
    import os
    from concurrent.futures import ThreadPoolExecutor

    read_only = tmpfs("1M", read_only=True)
    data = tmp_path / "data.json"
    data.write_text(json.dumps([{"instruction": f"Say {i}.", "output": f"{i}"} for i in range(8)]))
    common = ["finetune", "--model_name", str(tiny_model_dir), "--dataset", "alpaca_dataset",
              "--alpaca_dataset.data_path", str(data), "--device", "cpu", "--max_train_step", "1"]
    cases = {
        "--output_dir": [*common, "--output_dir", str(read_only / "out")],
        "--dist_checkpoint_root_folder": [*common, "--output_dir", str(tmp_path / "out"), "--save_every_n_steps", "1",
                                          "--dist_checkpoint_root_folder", str(read_only / "ckpts")],
    }
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}

    def run(item):
        flag, args = item
        return flag, shardtune_cli(args, timeout=300, env=env)

    with ThreadPoolExecutor(2) as pool:
        results = dict(pool.map(run, cases.items()))
    for flag, proc in results.items():
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, (flag, proc.stderr[-3000:])
        assert f"error: {flag} '{read_only}/" in proc.stderr, proc.stderr[-3000:]
        assert f"cannot be created: {read_only} is on a read-only file system" in proc.stderr, proc.stderr[-3000:]
        assert "train data:" not in proc.stdout  # refused before the data, the model or training
    assert not (tmp_path / "out").exists()  # nothing written anywhere
