"""``--resume`` with settings that differ from the checkpoint's (one process, the real recipe): a new
lr takes effect and is recorded, a new batch size or seed trains exactly the epoch's untrained
samples, changed data in the middle of an epoch and a changed LoRA rank are refused by name."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import yaml

from shardtune.checkpoint import layout
from shardtune.config.errors import ShardtuneError
from shardtune.finetuning import main as finetune

ROWS = 48  # 46 training samples after alpaca's held-out 5% (the runs' start-up line says so)


def _write_rows(path: Path, n: int, verb: str = "Spell") -> Path:
    path.write_text(json.dumps([{"instruction": f"{verb} {i}.", "output": " ".join(str(i))} for i in range(n)]))
    return path


def _args(model: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return ["--model_name", str(model), "--dataset", "alpaca_dataset", "--alpaca_dataset.data_path", str(data),
            "--output_dir", str(out), "--device", "cpu", "--batching_strategy", "padding", "--context_length", "64",
            "--lr", "2e-3", "--seed", "3", "--num_epochs", "2", "--save_model", "False", "--run_validation", "False",
            "--batch_size_training", "2", "--save_metrics", "--save_every_n_steps", "3", *extra]


@pytest.fixture(scope="module")
def first(tiny_model_dir, tmp_path_factory):
    """3 steps of 2 samples (6 of epoch 1's 46 trained), checkpoint at step 3."""
    root = tmp_path_factory.mktemp("resume-changes")
    data = _write_rows(root / "data.json", ROWS)
    out = root / "out"
    finetune(_args(tiny_model_dir, data, out, "--max_train_step", "3"))
    return {"model": tiny_model_dir, "data": data, "out": out, "root": root}


def _resume(first, tmp_path, capsys, *extra, data: Path | None = None) -> tuple[dict, str, Path]:
    out = tmp_path / "out"
    shutil.copytree(first["out"], out)
    capsys.readouterr()
    results = finetune(_args(first["model"], data or first["data"], out, "--resume", *extra))
    return results, capsys.readouterr().out, out


def _metrics(out: Path) -> dict:
    return json.loads((out / "metrics.json").read_text())


def test_a_new_lr_takes_effect_from_the_resumed_step_and_is_recorded(first, tmp_path, capsys):
    same, _, _ = _resume(first, tmp_path / "same", capsys, "--max_train_step", "6")
    changed, said, out = _resume(first, tmp_path / "new", capsys, "--max_train_step", "6", "--lr", "1e-3")
    assert "resume: --lr 0.002 -> 0.001: the new lr applies from step 4 on" in said
    assert _metrics(out)["train_step_lr"] == pytest.approx([2e-3] * 3 + [1e-3] * 3, rel=1e-9)
    a, b = same["train_step_loss"], changed["train_step_loss"]
    assert len(a) == len(b) == 6 and a[:4] == pytest.approx(b[:4], rel=1e-6)  # step 4's loss precedes its update
    assert all(not math.isclose(x, y, rel_tol=1e-6) for x, y in zip(a[4:], b[4:]))  # the new lr moved the weights
    saved = yaml.safe_load((out / "checkpoints" / "fine-tuned" / "step-000006" / "train_params.yaml").read_text())
    assert saved["train_config"]["lr"] == 1e-3  # the config in effect


def test_a_new_batch_size_trains_exactly_the_untrained_rest_of_the_epoch(first, tmp_path, capsys):
    results, said, out = _resume(first, tmp_path, capsys, "--batch_size_training", "4")
    assert ("resume: data position: 6 samples of epoch 1 were trained in global batches of 2 (seed 3); its "
            "other 40 samples are trained now in 10 global batches of 4 (seed 3)") in said
    # 3 steps before, the 40 untrained samples in 10 steps, then epoch 2's 46 samples in 11 steps of 4 (2 left over)
    assert results["steps"] == 3 + 10 + 11
    # steplr: the lr drops by gamma when epoch 2 starts (step 14), counted in this layout's epochs
    assert _metrics(out)["train_step_lr"] == pytest.approx([2e-3] * 13 + [2e-3 * 0.85] * 11, rel=1e-9)
    # the step-6 checkpoint (mid-epoch) records the samples the old layout trained, and a further
    # resume with the first batch size continues from both layouts' samples: 6 + 3 x 4 = 18
    ckpt = out / "checkpoints" / "fine-tuned" / "step-000006"
    position = json.loads((ckpt / "train_state.json").read_text())["position"]
    assert len(position["trained"]) == 6 and position["batch"] == 3 and position["data"]["global_batch"] == 4
    again = tmp_path / "again"
    capsys.readouterr()
    results = finetune(_args(first["model"], first["data"], again, "--resume_from", str(ckpt), "--num_epochs", "1"))
    assert ("18 samples of epoch 1 were trained in global batches of 4 (seed 3); its other 28 samples are "
            "trained now in 14 global batches of 2") in capsys.readouterr().out
    assert results["steps"] == 6 + 14


def test_a_new_seed_continues_the_epoch_with_its_untrained_samples(first, tmp_path, capsys):
    results, said, _ = _resume(first, tmp_path, capsys, "--seed", "4", "--num_epochs", "1")
    assert "resume: --seed 3 -> 4: this seed's sample order from now on; epoch 1 goes on with the samples" in said
    assert "6 samples of epoch 1 were trained in global batches of 2 (seed 3); its other 40 samples are " \
           "trained now in 20 global batches of 2 (seed 4)" in said
    assert results["steps"] == 3 + 20


def test_changed_data_in_the_middle_of_an_epoch_is_refused(first, tmp_path, capsys):
    original = first["data"].read_text()
    try:  # the same file, shortened: the saved position would be past its end
        _write_rows(first["data"], 10)
        with pytest.raises(ShardtuneError, match=r"training data's content changed since the checkpoint \(46 "
                                                 r"rows then, 9 now\).*middle of epoch 1"):
            _resume(first, tmp_path, capsys)
        # a checkpoint from before the data record (an older shardtune's, without digests too) is checked
        # by its position: 3 batches of 2 done, and the shortened file's 5 training rows make 2
        out = tmp_path / "old"
        shutil.copytree(first["out"], out)
        ckpt = out / "checkpoints" / "fine-tuned" / "step-000003"
        state = json.loads((ckpt / "train_state.json").read_text())
        del state["position"]["data"]
        (ckpt / "train_state.json").write_text(json.dumps(state))
        (ckpt / layout.COMPLETE_MARKER).write_text("ok\n")
        _write_rows(first["data"], 6)
        with pytest.raises(ShardtuneError, match=r"data position \(3 global batches of 2 rows done in epoch 1\) "
                                                 r"is past the end of the training data, which makes 2 such batches"):
            finetune(_args(first["model"], first["data"], out, "--resume"))
    finally:
        first["data"].write_text(original)
    other = _write_rows(tmp_path / "other.json", ROWS, "Say")  # another file: named with both paths
    with pytest.raises(ShardtuneError, match=r"--alpaca_dataset.data_path .*data.json' -> .*other.json'"):
        _resume(first, tmp_path / "b", capsys, data=other)
    # the same rows under another name are the same data: nothing to refuse
    same = tmp_path / "copy.json"
    shutil.copy(first["data"], same)
    results, said, _ = _resume(first, tmp_path / "c", capsys, "--max_train_step", "4", data=same)
    assert "the training rows are the same as the checkpoint's" in said and results["steps"] == 4


def test_a_new_data_file_at_an_epoch_boundary_is_used_from_the_next_epoch(first, tmp_path, capsys):
    # one whole epoch of 23 steps, checkpoint at its end; then epoch 2 on a file of 24 rows
    done = tmp_path / "done"
    finetune(_args(first["model"], first["data"], done, "--max_train_step", "23", "--save_every_n_steps", "23"))
    more = _write_rows(tmp_path / "more.json", 24)  # 23 training samples: 11 batches of 2
    capsys.readouterr()
    results = finetune(_args(first["model"], more, done, "--resume", "--save_every_n_steps", "23"))
    said = capsys.readouterr().out
    assert "--alpaca_dataset.data_path" in said and "new training rows from epoch 2 on" in said
    assert results["steps"] == 23 + 11


def test_a_changed_lora_rank_is_refused_by_name(tiny_model_dir, first, tmp_path):
    out = tmp_path / "lora"
    lora = ["--use_peft", "--peft_method", "lora", "--max_train_step", "3"]
    finetune(_args(tiny_model_dir, first["data"], out, *lora))
    with pytest.raises(ShardtuneError, match=r"--lora_config.r is 8 in the checkpoint and 16 now"):
        finetune(_args(tiny_model_dir, first["data"], out, *lora, "--resume", "--lora_config.r", "16"))
    # a checkpoint without its settings (an older shardtune's: no digests, no train_params.yaml):
    # the shapes are named, and no earlier checkpoint is advised (they would fail the same way)
    ckpt = layout.latest_checkpoint(out / "checkpoints" / "fine-tuned")
    (ckpt / layout.COMPLETE_MARKER).write_text("ok\n")
    (ckpt / "train_params.yaml").unlink()
    with pytest.raises(ShardtuneError, match=r"lora_A.*is \[8, \d+\] in the checkpoint and \[16, \d+\] here") as err:
        finetune(_args(tiny_model_dir, first["data"], out, *lora, "--resume", "--lora_config.r", "16"))
    assert "--lora_config.r" in str(err.value) and "earlier checkpoint" not in str(err.value)


def test_switching_to_preference_tuning_is_refused_by_name(first, tmp_path):
    """A fine-tuning checkpoint resumed with --use_dpo would continue another objective (its loss,
    metrics and schedule are the fine-tuning run's): refused, naming the flag, before any step."""
    out = tmp_path / "out"
    shutil.copytree(first["out"], out)
    pairs = tmp_path / "pairs.json"
    pairs.write_text(json.dumps([{"prompt": f"Spell {i}.", "chosen": " ".join(str(i)), "rejected": f"no {i}"}
                                 for i in range(ROWS)]))
    args = _args(first["model"], pairs, out, "--resume", "--use_dpo")
    args[args.index("alpaca_dataset")] = "preference_dataset"
    args[args.index("--alpaca_dataset.data_path")] = "--preference_dataset.data_path"
    with pytest.raises(ShardtuneError, match=r"--use_dpo is False in the checkpoint and True now"):
        finetune(args)
