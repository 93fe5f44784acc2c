"""Checkpoint folder publishing: atomic commit, re-saving a step, recovery after a crash, pruning."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from shardtune.checkpoint import layout
from shardtune.config.errors import ShardtuneError


def _written(run: Path, step: int, content: str) -> Path:
    """A fully written (not yet committed) checkpoint folder, as every rank leaves it."""
    tmp = layout.temp_dir_for(run, step)
    tmp.mkdir(parents=True)
    (tmp / ".metadata").write_text(content)
    return tmp


def test_commit_publishes_and_moves_latest(tmp_path):
    run = tmp_path / "run"
    for step in (2, 4):
        layout.commit(_written(run, step, f"s{step}"), run / layout.step_dir_name(step))
    assert [p.name for p in layout.complete_checkpoints(run)] == ["step-000002", "step-000004"]
    assert layout.latest_checkpoint(run) == run / "step-000004"
    assert not list(run.glob(".tmp-*"))


def test_saving_a_step_again_replaces_it_and_leaves_nothing_aside(tmp_path):
    run = tmp_path / "run"
    final = run / layout.step_dir_name(3)
    layout.commit(_written(run, 3, "first"), final)
    layout.commit(_written(run, 3, "second"), final)
    assert (final / ".metadata").read_text() == "second"
    assert sorted(p.name for p in run.iterdir()) == ["latest", "step-000003"]


def test_a_crash_between_moving_aside_and_publishing_is_undone_by_prune(tmp_path):
    run = tmp_path / "run"
    final = run / layout.step_dir_name(3)
    layout.commit(_written(run, 3, "first"), final)
    _written(run, 3, "second")  # the re-save's shards are written...
    os.replace(final, run / ".replaced-step-000003")  # ...the old one moved aside, then the crash
    assert layout.latest_checkpoint(run) is None
    layout.prune(run, keep_last_n=0)
    assert (final / ".metadata").read_text() == "first" and layout.latest_checkpoint(run) == final
    assert sorted(p.name for p in run.iterdir()) == ["latest", "step-000003"]


def test_resume_from_a_checkpoint_set_aside_by_a_crash_is_not_refused_before_prune_restores_it(tmp_path):
    """preflight checks --resume_from before the run prunes (which puts the set-aside copy back):
    the run's folder and the step's own path both still name a checkpoint to resume."""
    run = tmp_path / "run"
    final = run / layout.step_dir_name(3)
    layout.commit(_written(run, 3, "first"), final)
    os.replace(final, run / ".replaced-step-000003")  # a re-save set it aside, then the crash
    assert layout.resume_point(run) == run and layout.resume_point(final) == final
    layout.prune(run, keep_last_n=0)
    assert layout.latest_checkpoint(run) == final
    (run / "step-000009").mkdir()  # not set aside, not complete: still refused
    with pytest.raises(ShardtuneError, match="incomplete"):
        layout.resume_point(run / "step-000009")


def test_a_leftover_aside_copy_of_a_superseded_step_is_deleted(tmp_path):
    run = tmp_path / "run"
    final = run / layout.step_dir_name(3)
    layout.commit(_written(run, 3, "new"), final)
    aside = run / ".replaced-step-000003"
    aside.mkdir()
    (aside / ".metadata").write_text("old")
    layout.prune(run, keep_last_n=0)
    assert not aside.exists() and (final / ".metadata").read_text() == "new"


def test_prune_keeps_the_newest_n(tmp_path):
    run = tmp_path / "run"
    for step in (1, 2, 3):
        layout.commit(_written(run, step, "x"), run / layout.step_dir_name(step))
    layout.prune(run, keep_last_n=2)
    assert [p.name for p in layout.complete_checkpoints(run)] == ["step-000002", "step-000003"]


def test_resume_messages_tell_a_non_checkpoint_from_interrupted_saves(tmp_path):
    import pytest

    from shardtune.checkpoint.sharded import read_train_state
    from shardtune.config.errors import ShardtuneError

    (tmp_path / "notes").mkdir()
    with pytest.raises(ShardtuneError, match="is not a shardtune checkpoint"):
        read_train_state(tmp_path / "notes")
    run = tmp_path / "run"
    (run / "step-000004").mkdir(parents=True)
    (run / "step-000004" / "__0_0.distcp").write_bytes(b"x")
    with pytest.raises(ShardtuneError, match=r"none of its checkpoints \(step-000004\) is complete"):
        read_train_state(run)
    with pytest.raises(ShardtuneError, match="is incomplete .*its save was interrupted"):
        read_train_state(run / "step-000004")
