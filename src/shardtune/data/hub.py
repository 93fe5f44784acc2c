"""Loading a dataset from the Hugging Face Hub (the optional ``datasets`` package), with one kind
of error for every way it fails: offline, unreachable, unknown name, split or subset all mean
"use a local copy", and the message says how."""

from __future__ import annotations

from typing import Any

from ..config.errors import ShardtuneError


def load_from_hub(what: str, instead: str, *args: Any, **kwargs: Any):
    """``datasets.load_dataset(*args, **kwargs)``; a failure is a ShardtuneError saying that ``what``
    could not be loaded and to do ``instead``."""
    import datasets

    try:
        return datasets.load_dataset(*args, **kwargs)
    except Exception as e:  # offline, unreachable, unknown split or subset
        offline = " (offline mode is on: HF_HUB_OFFLINE)" if datasets.config.HF_HUB_OFFLINE else ""
        raise ShardtuneError(f"Could not load {what} from the Hugging Face Hub{offline}: {type(e).__name__}: "
                             f"{e}. {instead}") from None
