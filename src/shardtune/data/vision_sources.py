"""Where ``--dataset ocrvqa_dataset`` rows come from, and how a one-split source is split.

Sources (``--ocrvqa_dataset.data_path``): a ``.jsonl`` / ``.json`` / ``.parquet`` file, a folder
written by ``datasets``' ``save_to_disk``, or (empty) ``datasets.load_dataset(hub_name,
name=subset)``. Folders and the hub need the optional ``datasets`` package. See ``data/vision.py``
for the split rule.
"""

from __future__ import annotations

import importlib.util
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Optional

from ..config.configs import ocrvqa_dataset
from ..config.errors import ShardtuneError
from .files import read_records
from .hub import load_from_hub
from .rows import row_name

FLAG = "--ocrvqa_dataset.data_path"
SPLIT_SEED = 42  # llama-recipes' ocrvqa_dataset.py: train_test_split(..., seed=42)
_SAVED_MARKERS = ("dataset_dict.json", "state.json", "dataset_info.json")


def _is_saved_dataset(path: Path) -> bool:
    return path.is_dir() and any((path / m).is_file() for m in _SAVED_MARKERS)


def check_source(config: ocrvqa_dataset) -> None:
    """Refuse, before any work, a source that needs ``datasets`` when it is not installed."""
    path = Path(config.data_path) if config.data_path else None
    if path is not None and not _is_saved_dataset(path):
        return
    if importlib.util.find_spec("datasets") is None:
        what = (f"--dataset ocrvqa_dataset without {FLAG} loads {config.hub_name!r} (subset "
                f"{config.subset!r}) from the Hugging Face Hub" if path is None else
                f"{FLAG} {path} is a folder written by `datasets` (save_to_disk)")
        raise ShardtuneError(
            f"{what}, which needs the `datasets` package, and it is not installed. Install it (pip "
            f"install 'shardtune[hub]', or pip install datasets), or pass {FLAG} pointing at a "
            ".jsonl, .json or .parquet file of rows {\"images\": [...], "
            "\"texts\": [{\"user\": ..., \"assistant\": ...}]}.")


# --- sources and splits ----------------------------------------------------------------------

def split_indices(n: int, split_ratio: float, source: str) -> tuple[list[int], list[int]]:
    """(train, test) row indices, as ``datasets``' train_test_split(test_size=1 - split_ratio,
    shuffle=True, seed=42) draws them."""
    import numpy as np

    if not 0.0 < split_ratio < 1.0:
        raise ShardtuneError(f"--ocrvqa_dataset.split_ratio must be between 0 and 1 (exclusive), got "
                             f"{split_ratio}; it is the share of {source} used for training.")
    n_test = math.ceil((1 - split_ratio) * n)
    if n_test < 1 or n - n_test < 1:
        raise ShardtuneError(f"{source} has {n} rows, too few to split with --ocrvqa_dataset.split_ratio "
                             f"{split_ratio} ({n - n_test} train / {n_test} test). Add rows or change it.")
    perm = np.random.default_rng(SPLIT_SEED).permutation(n).tolist()
    return perm[n_test:], perm[:n_test]


def _choose(splits: Mapping[str, Any], config: ocrvqa_dataset, split: str, source: str):
    """(rows of the split's source, the indices of the requested split's rows in it, source name)
    from a mapping of split name -> rows (a list or a Dataset); "" names the only split of a file."""
    want = config.train_split if split == "train" else config.test_split
    cap = (lambda n: min(n, config.max_rows)) if config.max_rows > 0 else (lambda n: n)
    both = config.train_split in splits and config.test_split in splits
    if both and config.train_split != config.test_split:
        rows = splits[want]
        return rows, list(range(cap(len(rows)))), f"{source}[{want}]"
    if config.train_split in splits:
        name = config.train_split
    elif len(splits) == 1:
        name = next(iter(splits))
    else:
        raise ShardtuneError(
            f"{source} has the splits {sorted(splits)}, none of them --ocrvqa_dataset.train_split "
            f"{config.train_split!r}. Set --ocrvqa_dataset.train_split to the split to train on (it is "
            "divided by split_ratio), or set both train_split and test_split to use two splits as they are.")
    rows = splits[name]
    train_idx, test_idx = split_indices(cap(len(rows)), config.split_ratio, source)
    return rows, train_idx if split == "train" else test_idx, f"{source}[{name}]" if name else source


def read_source(config: ocrvqa_dataset, split: str):
    """(rows, where, base folder for relative image paths, source name) of the requested split."""
    if not config.data_path:
        check_source(config)
        return _from_datasets(_load_hub(config), config, split, f"{config.hub_name}:{config.subset}", None)
    path = Path(config.data_path)
    if path.is_dir():
        if not _is_saved_dataset(path):
            raise ShardtuneError(
                f"{FLAG} {path} is a folder, but not one written by `datasets`' save_to_disk (it has none "
                f"of {list(_SAVED_MARKERS)}). Point {FLAG} at such a folder or at a .jsonl, .json or "
                ".parquet file.")
        check_source(config)
        import datasets

        return _from_datasets(datasets.load_from_disk(str(path)), config, split, str(path), path)
    if path.suffix.lower() == ".csv":
        raise ShardtuneError(f"{path}: ocrvqa_dataset rows hold lists (images, texts), which CSV cannot; "
                             f"use a .jsonl, .json or .parquet file.")
    records, where = read_records(path, flag=FLAG)
    rows, idx, source = _choose({"": records}, config, split, str(path))
    return [rows[i] for i in idx], (lambda i: where(idx[i])), path.parent, source


def _from_datasets(ds, config: ocrvqa_dataset, split: str, source: str, base: Optional[Path]):
    import datasets

    splits = dict(ds) if isinstance(ds, datasets.DatasetDict) else {"": ds}
    rows, idx, name = _choose(splits, config, split, source)
    if "images" in rows.column_names:  # keep encoded bytes: decoding every image now costs memory
        rows = rows.cast_column("images", _undecoded(rows.features["images"]))
    return rows.select(idx).to_list(), (lambda i: row_name(idx[i])), base, name


def _undecoded(feature):
    """The ``images`` feature with its ``Image`` parts set to ``decode=False``."""
    import dataclasses

    import datasets

    if isinstance(feature, datasets.Image):
        return datasets.Image(decode=False)
    if isinstance(feature, list) and feature:
        return [_undecoded(feature[0])]
    if dataclasses.is_dataclass(feature) and hasattr(feature, "feature"):  # List / Sequence
        return dataclasses.replace(feature, feature=_undecoded(feature.feature))
    return feature


def _load_hub(config: ocrvqa_dataset):
    return load_from_hub(
        f"{config.hub_name!r} subset {config.subset!r}",
        "Download it where you have access (for example datasets.load_dataset(...).save_to_disk(DIR)) "
        f"and pass {FLAG} DIR, or a .jsonl/.parquet file of rows.",
        config.hub_name, name=config.subset or None)
