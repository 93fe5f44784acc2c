"""Checkpoint conversion and inspection: any FSDP checkpoint -> a Hugging Face model folder.

``convert(src, dst, ...)`` (``shardtune convert``) and ``inspect_path(path)`` (``shardtune inspect``);
docs/convert.md describes the input kinds, key normalisation, memory use and verification.
"""

from .core import convert
from .inspection import inspect_path
from .sources import open_source

__all__ = ["convert", "inspect_path", "open_source"]
