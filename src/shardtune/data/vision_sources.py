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
from functools import partial
from pathlib import Path
from typing import Any, Callable, Optional

from ..config.configs import ocrvqa_dataset
from ..config.errors import ShardtuneError
from .files import read_records
from .hub import load_from_hub
from .images import check_stored
from .rows import row_name
from .stored_images import DatasetImage, ParquetImage, store_images

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


Owns = Callable[[int], bool]  # whether this rank checks the images of the split's row i


def _everything(i: int) -> bool:
    return True


def read_source(config: ocrvqa_dataset, split: str, owns: Owns = _everything):
    """(rows, where, base folder for relative image paths, source name) of the requested split.
    Embedded images are checked as they are read where ``owns(i)`` (``image_checks.py``)."""
    if not config.data_path:
        check_source(config)
        return _from_datasets(_load_hub(config), config, split, f"{config.hub_name}:{config.subset}", None, owns)
    path = Path(config.data_path)
    if path.is_dir():
        if not _is_saved_dataset(path):
            raise ShardtuneError(
                f"{FLAG} {path} is a folder, but not one written by `datasets`' save_to_disk (it has none "
                f"of {list(_SAVED_MARKERS)}). Point {FLAG} at such a folder or at a .jsonl, .json or "
                ".parquet file.")
        check_source(config)
        import datasets

        return _from_datasets(datasets.load_from_disk(str(path)), config, split, str(path), path, owns)
    if path.suffix.lower() == ".csv":
        raise ShardtuneError(f"{path}: ocrvqa_dataset rows hold lists (images, texts), which CSV cannot; "
                             f"use a .jsonl, .json or .parquet file.")
    if path.suffix.lower() == ".parquet" and path.is_file():
        return _from_parquet(path, config, split, owns)
    records, where = read_records(path, flag=FLAG)
    rows, idx, source = _choose({"": records}, config, split, str(path))
    return [rows[i] for i in idx], (lambda i: where(idx[i])), path.parent, source


def _from_parquet(path: Path, config: ocrvqa_dataset, split: str, owns: Owns):
    """The split's rows, read one row group at a time, their embedded images left in the file
    (``stored_images.ParquetImage``): no process holds more than a row group's bytes. Only the
    images of ``owns``' rows are decoded to check them."""
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
    except Exception as e:  # noqa: BLE001 - pyarrow's ArrowInvalid and OSError
        raise ShardtuneError(f"{FLAG} {path} is not a readable parquet file ({type(e).__name__}: {e}).") from None
    _, idx, source = _choose({"": range(parquet.metadata.num_rows)}, config, split, str(path))
    position = {row: j for j, row in enumerate(idx)}
    rows: list = [None] * len(idx)
    start, resolved = 0, str(path.resolve())
    for group in range(parquet.num_row_groups):
        n = parquet.metadata.row_group(group).num_rows
        wanted = [i for i in range(start, start + n) if i in position]
        if wanted:
            table = parquet.read_row_group(group).take([i - start for i in wanted])
            for i, row in zip(wanted, table.to_pylist()):
                make = partial(_parquet_image, resolved, group, i - start)
                rows[position[i]] = store_images(row, make, check_stored if owns(position[i]) else None)
        start += n
    return rows, (lambda i: row_name(idx[i])), path.parent, source


def _parquet_image(path: str, group: int, row: int, k: int, nbytes: int) -> ParquetImage:
    return ParquetImage(nbytes=nbytes, path=path, row_group=group, row=row, k=k)


def _dataset_image(dataset, row: int, k: int, nbytes: int) -> DatasetImage:
    return DatasetImage(nbytes=nbytes, dataset=dataset, row=row, k=k)


def _from_datasets(ds, config: ocrvqa_dataset, split: str, source: str, base: Optional[Path], owns: Owns):
    import datasets

    splits = dict(ds) if isinstance(ds, datasets.DatasetDict) else {"": ds}
    rows, idx, name = _choose(splits, config, split, source)
    if "images" not in rows.column_names:  # every row is refused for it when encoded
        return rows.select(idx).to_list(), (lambda i: row_name(idx[i])), base, name
    # The rows as stored (arrow format: images are encoded bytes, never decoded; no cast, which
    # would write a cache file into the dataset's folder), a chunk at a time; the images are left
    # in the memory-mapped dataset (``stored_images.DatasetImage``).
    stored = rows.with_format("arrow")
    out = []
    for start in range(0, len(idx), _CHUNK):
        part = idx[start:start + _CHUNK]
        for j, (i, row) in enumerate(zip(part, stored[part].to_pylist()), start):
            out.append(store_images(row, partial(_dataset_image, stored, i), check_stored if owns(j) else None))
    return out, (lambda i: row_name(idx[i])), base, name


_CHUNK = 256  # rows read at once from a ``datasets`` dataset


def _load_hub(config: ocrvqa_dataset):
    return load_from_hub(
        f"{config.hub_name!r} subset {config.subset!r}",
        "Download it where you have access (for example datasets.load_dataset(...).save_to_disk(DIR)) "
        f"and pass {FLAG} DIR, or a .jsonl/.parquet file of rows.",
        config.hub_name, name=config.subset or None)
