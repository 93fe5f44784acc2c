"""train/reference_store.py: --dpo_config.precompute_reference's values on disk, recorded with their
digest in the output folder's marker, read back only when they are this run's."""

from __future__ import annotations

import json

import torch

from shardtune.outputs import ownership
from shardtune.train.reference_store import (FILE, load_reference_logps, reference_identity,
                                             save_reference_logps)

IDENTITY = reference_identity("/models/base", "4bit")
PRINTS = {"train": "0123456789abcdef", "eval": "fedcba9876543210"}


def _values() -> dict:
    torch.manual_seed(0)
    return {"train": torch.randn(5, 2, dtype=torch.float64) * 30, "eval": torch.randn(1, 2, dtype=torch.float64)}


def test_saved_values_are_recorded_and_read_back_exactly(tmp_path):
    values = _values()
    path = save_reference_logps(tmp_path, IDENTITY, PRINTS, values)
    assert path == tmp_path / FILE and FILE in ownership.owned(tmp_path) and not ownership.foreign_entries(tmp_path)
    assert ownership.recorded_digests(tmp_path)[FILE]["bytes"] == path.stat().st_size
    got, why = load_reference_logps(tmp_path, IDENTITY, PRINTS)
    assert why == "" and set(got) == {"train", "eval"}
    for name in values:
        assert torch.equal(got[name], values[name])  # float64, bit for bit


def test_other_rows_another_reference_an_edit_or_a_foreign_file_are_not_read(tmp_path):
    save_reference_logps(tmp_path, IDENTITY, PRINTS, _values())
    cases = [
        ({**PRINTS, "train": "0000000000000000"}, IDENTITY, "the train rows differ"),
        ({"train": PRINTS["train"]}, IDENTITY, "holds the splits"),
        (PRINTS, reference_identity("/models/base", None), "another reference"),
    ]
    for prints, identity, why in cases:
        got, said = load_reference_logps(tmp_path, identity, prints)
        assert got is None and why in said, said
    path = tmp_path / FILE
    data = json.loads(path.read_text())
    data["splits"]["train"]["logps"][0][0] += 1.0
    path.write_text(json.dumps(data) + "\n")
    got, said = load_reference_logps(tmp_path, IDENTITY, PRINTS)
    assert got is None and "not what shardtune wrote" in said, said
    other = tmp_path / "other"
    other.mkdir()
    (other / FILE).write_text(path.read_text())  # the same bytes, not recorded as shardtune's
    got, said = load_reference_logps(other, IDENTITY, PRINTS)
    assert got is None and "not recorded" in said, said
    got, said = load_reference_logps(tmp_path / "none", IDENTITY, PRINTS)
    assert got is None and "does not exist" in said
