"""Fixtures for the data tests: configs pointing at small files written into tmp_path.

(pytest runs with --import-mode=importlib, so helpers are handed out as fixtures.)
"""

from __future__ import annotations

import json

import pytest

from shardtune.config import Config


def _make_config(dataset: str, **train) -> Config:
    cfg = Config()
    cfg.train.dataset = dataset
    cfg.train.context_length = train.pop("context_length", 512)
    for key, value in train.items():
        setattr(cfg.train, key, value)
    return cfg


def _alpaca_rows(n: int) -> list[dict]:
    rows = []
    for i in range(n):
        row = {"instruction": f"Add {i} and {i + 1}.", "output": f"The answer is {2 * i + 1}."}
        if i % 2:
            row["input"] = f"numbers: {i} {i + 1}"
        rows.append(row)
    return rows


@pytest.fixture
def make_config():
    """make_config(dataset_name, **train_config_fields) -> Config (context_length 512 by default)."""
    return _make_config


@pytest.fixture
def alpaca_rows():
    return _alpaca_rows


@pytest.fixture
def alpaca_cfg(tmp_path):
    """alpaca_cfg(rows=None, **train) -> Config over ``rows`` (default: 40 generated rows)."""

    def build(rows=None, **train) -> Config:
        cfg = _make_config("alpaca_dataset", **train)
        path = tmp_path / "alpaca.json"
        path.write_text(json.dumps(_alpaca_rows(40) if rows is None else rows), encoding="utf-8")
        cfg.dataset_config.data_path = str(path)
        return cfg

    return build
