"""Custom datasets: ``--custom_dataset.file path.py[:function]``, as in llama-recipes.

The function (default ``get_custom_dataset``) is called as ``fn(dataset_config, tokenizer,
split_name)`` with ``split_name`` = ``train_split`` or ``test_split`` and returns rows with
``input_ids``, ``labels`` and optionally ``attention_mask`` (a list, a torch Dataset or a Hugging
Face Dataset). If the module defines ``get_data_collator(processor)``, it is called with the
tokenizer and its result collates the batches; the rows then go to it as returned (they are only
checked when they carry both ``input_ids`` and ``labels``). Unlike llama-recipes, the ``:function``
name is never used to look up the collator.

For a vision model (Llama 3.2 Vision) the model's **processor** (image processor + tokenizer +
chat template) is passed wherever a text model gets its tokenizer, as in llama-recipes: the file
defines ``get_custom_dataset(dataset_config, processor, split, split_ratio=0.9)`` returning raw
rows (e.g. ``{"images": [...], "texts": [...]}``) and ``get_data_collator(processor)`` returning a
collator that runs the processor and returns ``input_ids``, ``attention_mask``, ``labels``,
``pixel_values``, ``aspect_ratio_ids``, ``aspect_ratio_mask`` and ``cross_attention_mask``. Such
batches cannot be packed: use ``--batching_strategy padding``.

A collator may return any mapping: llama-cookbook's collators return the processor's
``BatchFeature`` (or a tokenizer's ``BatchEncoding``) with ``labels`` added, unchanged. Anything
else (a tuple, a batch without ``labels``) is refused at the first batch with an error that names
the file (``collate.plain_batch``).
"""

from __future__ import annotations

import hashlib
import importlib.util
import sys
from collections.abc import Mapping
from pathlib import Path
from types import ModuleType
from typing import Any, Callable, Optional

from ..config.configs import custom_dataset, train_config
from ..config.errors import ShardtuneError
from .collate import plain_batch
from .rows import RawSplit, check_tokenized

FLAG = "--custom_dataset.file"
DEFAULT_FUNCTION = "get_custom_dataset"
COLLATOR_FUNCTION = "get_data_collator"


def parse_spec(spec: str) -> tuple[Path, str]:
    """``"dir/file.py:fn"`` -> (path, "fn"); without ``:fn`` the function is get_custom_dataset."""
    path, func = spec, DEFAULT_FUNCTION
    if not spec.endswith(".py") and ":" in spec:
        path, func = spec.rsplit(":", 1)
    if not path.endswith(".py"):
        raise ShardtuneError(f"{FLAG} {spec!r} must name a Python file, as path/to/file.py or "
                             f"path/to/file.py:function_name.")
    if not func.isidentifier():
        raise ShardtuneError(f"{FLAG} {spec!r}: {func!r} is not a Python function name.")
    return Path(path), func


_MODULES: dict[tuple[str, int], ModuleType] = {}  # train and test splits share one import
# Custom dataset files are imported under this prefix; such a module exists only in the process
# that loaded it (see data/workers.py).
MODULE_PREFIX = "shardtune_custom_"


def load_module(path: Path) -> ModuleType:
    if not path.is_file():
        raise ShardtuneError(f"Custom dataset file {path} does not exist (resolved from the current "
                             f"directory {Path.cwd()}). Fix {FLAG}.")
    resolved = path.resolve()
    key = (str(resolved), resolved.stat().st_mtime_ns)
    if key not in _MODULES:
        name = f"{MODULE_PREFIX}{resolved.stem}_{hashlib.sha1(str(resolved).encode()).hexdigest()[:8]}"
        spec = importlib.util.spec_from_file_location(name, resolved)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # dataclasses and pickling look the module up by name
        spec.loader.exec_module(module)  # errors in the user's code keep their traceback
        _MODULES[key] = module
    return _MODULES[key]


def _as_rows(result: Any, where: str) -> Any:
    if isinstance(result, (list, tuple)):
        return result
    if result is None or isinstance(result, (str, bytes, Mapping)):
        raise ShardtuneError(
            f"{where} returned a {type(result).__name__}; it must return the split's rows: a list of "
            f"dicts with input_ids and labels, a torch Dataset or a Hugging Face Dataset.")
    if hasattr(result, "to_list") and hasattr(result, "__iter__"):  # HF Dataset: decoded rows
        return list(result)
    if hasattr(result, "__len__") and hasattr(result, "__getitem__"):  # map-style torch Dataset
        return [result[i] for i in range(len(result))]
    if hasattr(result, "__iter__"):  # iterable datasets
        return list(result)
    raise ShardtuneError(f"{where} returned a {type(result).__name__}, which is not a sequence of rows; "
                         f"return a list, a torch Dataset or a Hugging Face Dataset.")


def _encode_for_collator(row: Any) -> Any:
    if isinstance(row, Mapping) and "input_ids" in row and "labels" in row:
        return {**row, **check_tokenized(row)}
    return row


class CustomCollator:
    """A custom dataset file's collator, whose batches are checked and made plain dicts
    (``collate.plain_batch``), so that a wrong return value is named here, not met as a
    ``KeyError`` deep in the loop. ``source`` is the file, for the error."""

    def __init__(self, inner: Callable, source: str) -> None:
        self.inner, self.source = inner, source

    def __call__(self, rows: list) -> dict[str, Any]:
        return plain_batch(self.inner(rows), f"The data collator of {self.source} ({COLLATOR_FUNCTION})")


def data_collator(module: ModuleType, tokenizer, source: str) -> Optional[Callable]:
    factory = getattr(module, COLLATOR_FUNCTION, None)
    if factory is None:
        return None
    collator = factory(tokenizer)
    if not callable(collator):
        raise ShardtuneError(f"{source}: {COLLATOR_FUNCTION}(processor) returned a "
                             f"{type(collator).__name__}; it must return a callable collate function.")
    return CustomCollator(collator, source)


def load(config: custom_dataset, tokenizer, split: str, train: train_config) -> RawSplit:
    path, func_name = parse_spec(config.file)
    module = load_module(path)
    fn = getattr(module, func_name, None)
    if not callable(fn):
        names = sorted(n for n, v in vars(module).items() if callable(v) and not n.startswith("_"))
        raise ShardtuneError(f"Custom dataset file {path} has no function {func_name!r} (it defines "
                             f"{names}). Define it, or name one as {FLAG} {path}:function_name.")
    split_name = config.train_split if split == "train" else config.test_split
    where = f"{path}:{func_name}(dataset_config, tokenizer, {split_name!r})"
    rows = _as_rows(fn(config, tokenizer, split_name), where)
    collator = data_collator(module, tokenizer, str(path))
    if train.use_dpo:  # rows of preference pairs, encoded and batched as preference_dataset's
        if collator is not None:
            raise ShardtuneError(f"{path} defines {COLLATOR_FUNCTION}, but --use_dpo batches a pair's chosen and "
                                 "rejected responses itself (one padded batch of both). Remove it from the file, "
                                 "and return rows with prompt, chosen and rejected (docs/preference.md).")
        from .preference import pair_split

        return pair_split(f"{path}:{func_name}[{split_name}]", rows, tokenizer)
    return RawSplit(source=f"{path}:{func_name}[{split_name}]", rows=rows,
                    encode=_encode_for_collator if collator else check_tokenized,
                    collate_fn=collator, tokenized=collator is None)
