"""The one atomic write: the new bytes or the old ones, never half; one temporary name, which
ownership knows as shardtune's; and no other module renames files into place by hand."""

from __future__ import annotations

import ast
import os
from pathlib import Path

import pytest

from shardtune.outputs import ownership
from shardtune.outputs.atomic import TEMP_PATTERN, atomic_file, atomic_write, temp_path

SRC = Path(__file__).resolve().parents[2] / "src" / "shardtune"


def test_atomic_write_replaces_the_file_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "metrics.json"
    target.write_text("old")
    atomic_write(target, '{"new": 1}')
    assert target.read_text() == '{"new": 1}'
    atomic_write(target, b"\x00\x01")
    assert target.read_bytes() == b"\x00\x01"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.json"]


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "completions.jsonl"
    target.write_text("kept\n")
    with pytest.raises(RuntimeError):
        with atomic_file(target) as f:
            f.write("half a line")
            assert temp_path(target).is_file()  # the bytes go to the temporary name first
            raise RuntimeError("generation failed")
    assert target.read_text() == "kept\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["completions.jsonl"]


def test_one_temporary_name_that_ownership_knows(tmp_path):
    tmp = temp_path(tmp_path / "model.safetensors")
    assert tmp.parent == tmp_path and tmp.name == f".saving-model.safetensors.{os.getpid()}"
    ownership.record(tmp_path, added=["config.json"])
    (tmp_path / "config.json").write_text("{}")
    tmp.write_text("partial")  # left by a crash mid-write
    (tmp_path / ".saving-model.4242").mkdir()  # an export's folder, left by a crash
    (tmp_path / "notes.tmp").write_text("the user's")  # not shardtune's: its name is not ours
    assert ownership.foreign_entries(tmp_path) == ["notes.tmp"]
    assert sorted(ownership.remove_stale_temps(tmp_path)) == [".saving-model.4242", tmp.name]
    assert sorted(p.name for p in tmp_path.iterdir()) == [".shardtune-files.json", "config.json", "notes.tmp"]
    assert TEMP_PATTERN == ".saving-*"


# Modules that move whole folders into place (a step checkpoint, an export's or a conversion's
# files): they rename, but every file written whole goes through atomic_write / atomic_file.
FOLDER_COMMITS = {"outputs/atomic.py", "outputs/ownership.py", "checkpoint/layout.py", "convert/core.py"}


def test_no_hand_written_rename_outside_the_outputs_layer_and_folder_commits():
    found = []
    for path in sorted(SRC.rglob("*.py")):
        rel = path.relative_to(SRC).as_posix()
        for node in ast.walk(ast.parse(path.read_text())):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                    and node.func.attr in ("replace", "rename") and isinstance(node.func.value, ast.Name)
                    and node.func.value.id == "os" and rel not in FOLDER_COMMITS):
                found.append(f"{rel}:{node.lineno} os.{node.func.attr}")
    assert not found, "write files with shardtune.outputs.atomic (atomic_write / atomic_file):\n" + "\n".join(found)
