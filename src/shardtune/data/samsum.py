"""SAMSum dialogue summarisation: rows with ``dialogue`` and ``summary``.

Where the rows come from (``--samsum_dataset.data_path``):

* a folder: the split's file ``<folder>/<split>.<ext>`` (ext json, jsonl, parquet or csv), where
  split is ``train_split`` ("train") or ``test_split`` ("validation");
* a single file: it holds every row; as with alpaca, the first ``eval_fraction`` of its rows (at
  least one) is the test split and the rest the train split;
* empty: ``datasets.load_dataset("Samsung/samsum", split=...)`` from the Hugging Face Hub (or its
  local cache). This needs the optional ``datasets`` package (``pip install 'shardtune[hub]'``);
  without it, or offline without a cached copy, the error names the flag above.
"""

from __future__ import annotations

import importlib.util
from functools import partial
from pathlib import Path
from typing import Any

from ..config.configs import samsum_dataset, train_config
from ..config.errors import ShardtuneError
from .encoding import prompt_answer
from .files import FORMATS, read_records, require_columns
from .hub import load_from_hub
from .prompts import SAMSUM_PROMPT
from .rows import RawSplit, split_off_eval, text_field

HUB_NAME = "Samsung/samsum"
FLAG = "--samsum_dataset.data_path"
COLUMNS = ("dialogue", "summary")


def check_source(config: samsum_dataset) -> None:
    """Refuse, before any work, a hub load that cannot start: ``datasets`` is not installed."""
    if not config.data_path and importlib.util.find_spec("datasets") is None:
        raise ShardtuneError(
            f"--dataset samsum_dataset without {FLAG} loads {HUB_NAME!r} from the Hugging Face Hub, "
            "which needs the `datasets` package, and it is not installed. Install it (pip install "
            f"'shardtune[hub]', or pip install datasets), or download the data where you have access "
            f"and pass {FLAG} pointing at a folder with train/validation .json, .jsonl, .parquet or "
            "csv files, or at a single file with 'dialogue' and 'summary' fields.")


def encode(row: Any, tokenizer) -> dict[str, list[int]]:
    dialogue = text_field(row, "dialogue")
    summary = text_field(row, "summary")
    return prompt_answer(tokenizer, SAMSUM_PROMPT.format(dialog=dialogue), summary)


def load(config: samsum_dataset, tokenizer, split: str, train: train_config) -> RawSplit:
    name = config.train_split if split == "train" else config.test_split
    enc = partial(encode, tokenizer=tokenizer)
    if not config.data_path:
        rows = _load_hub(name, config.trust_remote_code)
        return RawSplit(source=f"{HUB_NAME}:{name}", rows=rows, encode=enc)
    path = Path(config.data_path)
    if path.is_dir():
        file = _split_file(path, name)
        rows, where = read_records(file, flag=FLAG)
        require_columns(rows, COLUMNS, file, FLAG)
        return RawSplit(source=str(file), rows=rows, encode=enc, where=where)
    rows, where = read_records(path, flag=FLAG)
    require_columns(rows, COLUMNS, path, FLAG)
    part, offset = split_off_eval(rows, split, train.eval_fraction, str(path))
    return RawSplit(source=str(path), rows=part, encode=enc, where=lambda i: where(i + offset))


def _split_file(folder: Path, name: str) -> Path:
    for ext in FORMATS:
        candidate = folder / f"{name}{ext}"
        if candidate.is_file():
            return candidate
    present = sorted(p.name for p in folder.iterdir())[:10]
    raise ShardtuneError(
        f"{folder} has no file for the {name!r} split (looked for {name}{{{','.join(FORMATS)}}}; the "
        f"folder holds {present}). Add it, set --samsum_dataset.train_split/test_split to the file "
        f"stems, or point {FLAG} at a single file (its first eval_fraction rows become the test split).")


def _load_hub(split: str, trust_remote_code: bool) -> list[dict]:
    import inspect

    check_source(samsum_dataset(data_path=""))
    import datasets

    kwargs = {}
    # datasets >= 4 dropped dataset scripts and the argument; pass it only where it exists.
    if trust_remote_code and "trust_remote_code" in inspect.signature(datasets.load_dataset).parameters:
        kwargs["trust_remote_code"] = True
    ds = load_from_hub(
        f"the samsum dataset {HUB_NAME!r} split {split!r}",
        f"Download it where you have access and pass {FLAG} pointing at a folder with "
        f"{split}.<json|jsonl|parquet|csv> files, or at a single file with 'dialogue' and 'summary' fields.",
        HUB_NAME, split=split, **kwargs)
    return ds.to_list()

