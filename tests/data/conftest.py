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


# --- vision (Llama 3.2 Vision / Mllama) ---

@pytest.fixture(scope="session")
def tiny_processor():
    """The tiny MllamaProcessor (BPE tokenizer + <|image|> + Llama 3 chat template, 28x28 tiles)."""
    from shardtune.demo.tiny import build_tiny_processor

    return build_tiny_processor()


@pytest.fixture
def write_images(tmp_path):
    """write_images(n, folder=tmp_path) -> PNG file names (distinct sizes and colours) in folder."""
    import numpy as np
    from PIL import Image

    def write(n: int, folder=None) -> list[str]:
        folder = folder or tmp_path
        names = []
        for i in range(n):
            pixels = np.random.RandomState(i).randint(0, 256, size=(20 + 7 * (i % 4), 30 + 5 * (i % 3), 3))
            Image.fromarray(pixels.astype("uint8")).save(folder / f"img{i}.png")
            names.append(f"img{i}.png")
        return names

    return write
