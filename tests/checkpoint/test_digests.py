"""Integrity: every checkpoint and output records its files' SHA-256, and every reader checks it.

A byte damaged in a model tensor of a step checkpoint is caught by ``shardtune convert`` (non-zero
exit, nothing written), by ``--resume`` (refused, naming the earlier checkpoint to use) and by
``shardtune checkpoints --verify``; an undamaged checkpoint passes. An exported model's damaged
weights stop ``generate``; an edited config is only reported."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest

from shardtune.checkpoint import layout
from shardtune.outputs.digests import DamagedFiles, digest_file
from shardtune.checkpoint.sharded import verify_checkpoint
from shardtune.finetuning import main as finetune


def _args(model: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return ["--model_name", str(model), "--dataset", "alpaca_dataset", "--alpaca_dataset.data_path", str(data),
            "--output_dir", str(out), "--device", "cpu", "--batching_strategy", "padding", "--context_length", "64",
            "--batch_size_training", "2", "--lr", "2e-3", "--seed", "3", "--num_epochs", "1",
            "--run_validation", "False", "--save_every_n_steps", "2", *extra]


@pytest.fixture
def cli(shardtune_cli):
    """``cli(*args)``: the shardtune command's CompletedProcess (conftest's ``shardtune_cli``)."""
    return lambda *args: shardtune_cli(args, timeout=300)


def _flip_byte_in_the_middle(file: Path) -> None:
    data = bytearray(file.read_bytes())
    data[len(data) // 2] ^= 0x01
    file.write_bytes(bytes(data))


@pytest.fixture(scope="module")
def run(tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("digests")
    data = root / "data.json"
    data.write_text(json.dumps([{"instruction": f"Spell {i}.", "output": " ".join(str(i))} for i in range(24)]))
    out = root / "out"
    finetune(_args(tiny_model_dir, data, out, "--max_train_step", "4", "--save_model", "True"))
    return {"root": root, "data": data, "out": out, "model": tiny_model_dir,
            "ckpts": out / "checkpoints" / "fine-tuned"}


def test_the_complete_marker_records_every_file_with_its_sha256(run, cli):
    for step in ("step-000002", "step-000004"):
        path = run["ckpts"] / step
        manifest = layout.read_manifest(path)
        files = sorted(p.name for p in path.iterdir() if p.is_file() and p.name != layout.COMPLETE_MARKER)
        assert sorted(manifest) == files and "__0_0.distcp" in files and ".metadata" in files
        for name, digest in manifest.items():
            content = (path / name).read_bytes()
            assert digest == {"bytes": len(content), "sha256": hashlib.sha256(content).hexdigest()}
        assert verify_checkpoint(path)
    proc = cli("checkpoints", str(run["ckpts"]), "--verify")
    assert proc.returncode == 0 and proc.stdout.count("verified") == 2, proc.stdout + proc.stderr


def test_the_exported_model_records_its_digests_and_generate_checks_them(run, tmp_path, cli):
    from shardtune.outputs import ownership

    recorded = ownership.recorded_digests(run["out"])
    assert "model.safetensors" in recorded and "config.json" in recorded
    assert recorded["model.safetensors"] == digest_file(run["out"] / "model.safetensors")
    copy = tmp_path / "model"
    shutil.copytree(run["out"], copy, ignore=shutil.ignore_patterns("checkpoints"))
    cfg = json.loads((copy / "config.json").read_text())
    cfg["max_position_embeddings"] = cfg.get("max_position_embeddings", 512)  # an edit that changes the bytes
    (copy / "config.json").write_text(json.dumps(cfg, indent=4))
    ok = cli("generate", str(copy), "--prompt", "Spell 3.", "--max_new_tokens", "2")
    assert ok.returncode == 0 and "config.json has" in ok.stderr and "edited since" in ok.stderr, ok.stderr[-2000:]
    _flip_byte_in_the_middle(copy / "model.safetensors")
    bad = cli("generate", str(copy), "--prompt", "Spell 3.", "--max_new_tokens", "2")
    assert bad.returncode != 0 and "model.safetensors does not match its recorded sha256" in bad.stderr
    assert "Traceback" not in bad.stderr


@pytest.fixture
def damaged(run, tmp_path):
    """A copy of the run whose newest checkpoint has one byte flipped in its model shard."""
    out = tmp_path / "out"
    shutil.copytree(run["out"], out)
    ckpts = out / "checkpoints" / "fine-tuned"
    _flip_byte_in_the_middle(ckpts / "step-000004" / "__0_0.distcp")
    return {"out": out, "ckpts": ckpts}


def test_convert_refuses_a_damaged_checkpoint_and_writes_nothing(damaged, tmp_path, cli):
    dst = tmp_path / "converted"
    proc = cli("convert", str(damaged["ckpts"] / "step-000004"), str(dst))
    assert proc.returncode != 0 and not dst.exists(), proc.stdout + proc.stderr
    assert "__0_0.distcp does not match its recorded sha256" in proc.stderr and "step-000004" in proc.stderr
    assert not list(tmp_path.glob(".converted*"))  # no temporary folder left either
    ok = cli("convert", str(damaged["ckpts"] / "step-000002"), str(dst))  # the good one converts
    assert ok.returncode == 0, ok.stderr[-2000:]


def test_resume_refuses_a_damaged_checkpoint_and_names_the_earlier_one(run, damaged, cli):
    with pytest.raises(DamagedFiles, match=r"__0_0\.distcp does not match.*--resume_from .*step-000002"):
        finetune(_args(run["model"], run["data"], damaged["out"], "--max_train_step", "6", "--resume",
                       "--save_model", "False", "--overwrite_output_dir"))
    # the damaged files stay as they were (nothing is rewritten over them)
    assert layout.read_manifest(damaged["ckpts"] / "step-000004")
    proc = cli("checkpoints", str(damaged["ckpts"]), "--verify")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    lines = dict(line.split(maxsplit=1) for line in proc.stdout.splitlines())
    assert lines["step-000002"].startswith("verified")
    assert lines["step-000004"].startswith("DAMAGED") and "__0_0.distcp" in lines["step-000004"]


def test_a_resumed_and_resaved_run_records_the_right_digests(run, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(run["out"], out)
    finetune(_args(run["model"], run["data"], out, "--max_train_step", "6", "--resume", "--save_model", "False"))
    ckpts = out / "checkpoints" / "fine-tuned"
    assert (ckpts / "step-000006").is_dir()
    for path in layout.complete_checkpoints(ckpts):
        assert verify_checkpoint(path)


def test_a_checkpoint_without_digests_is_checked_as_far_as_it_can_be(ranks, tmp_path, cli):
    """llama-recipes records no digests: its files are checked against the index sizes and every
    tensor is read and found finite."""
    proc = cli("checkpoints", str(ranks / "llama-recipes"), "--verify")
    assert proc.returncode == 0 and "no digests recorded" in proc.stdout, proc.stdout + proc.stderr
    copy = tmp_path / "llama-recipes"
    shutil.copytree(ranks / "llama-recipes", copy)
    shard = copy / "__1_0.distcp"
    shard.write_bytes(shard.read_bytes()[:-100])  # truncated
    proc = cli("checkpoints", str(copy), "--verify")
    assert proc.returncode == 1 and "truncated" in proc.stdout


def test_the_two_rank_checkpoints_record_both_ranks_files(ranks):
    path = ranks / "full" / "checkpoints" / "fine-tuned" / "step-000002"
    assert {"__0_0.distcp", "__1_0.distcp", "rng-rank0.pt", "rng-rank1.pt"} <= set(layout.read_manifest(path))
    assert verify_checkpoint(path)


def test_an_unreadable_complete_marker_is_damage_not_an_old_checkpoint(run, tmp_path, cli):
    """``garbage{`` in COMPLETE plus damaged shard bytes: resume refuses (naming the marker) instead
    of warning that the checkpoint predates digests and loading it; --verify fails it. A marker
    that holds an older shardtune's ``ok`` is still an old checkpoint, checked as far as it can be."""
    out = tmp_path / "out"
    shutil.copytree(run["out"], out)
    ckpt = out / "checkpoints" / "fine-tuned" / "step-000004"
    (ckpt / layout.COMPLETE_MARKER).write_text("garbage{")
    shard = ckpt / "__0_0.distcp"
    data = bytearray(shard.read_bytes())
    for i in range(64):
        data[len(data) // 2 + i] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(DamagedFiles, match=r"COMPLETE marker .* is not valid JSON.*--resume_from .*step-000002"):
        finetune(_args(run["model"], run["data"], out, "--max_train_step", "6", "--resume",
                       "--save_model", "False"))
    assert (ckpt / layout.COMPLETE_MARKER).read_text() == "garbage{"  # left as it was
    proc = cli("checkpoints", str(ckpt.parent), "--verify")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    lines = dict(line.split(maxsplit=1) for line in proc.stdout.splitlines())
    assert lines["step-000004"].startswith("DAMAGED") and "COMPLETE marker" in lines["step-000004"]
    assert lines["step-000002"].startswith("verified")
    # an older shardtune's marker: no digests to check, so the checkpoint is checked without them
    good = out / "checkpoints" / "fine-tuned" / "step-000002"
    (good / layout.COMPLETE_MARKER).write_text("ok\n")
    assert layout.read_manifest(good) is None and not verify_checkpoint(good)
