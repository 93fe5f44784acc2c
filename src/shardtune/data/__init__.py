"""Data: dataset registry -> tokenised samples with label masks -> padding/packing loaders.

The recipe calls ``load_split`` for each split, ``build_dataloader`` on its samples, and
``loader.batch_sampler.set_epoch(epoch)`` before each epoch.
"""

from ..batches import IGNORE_INDEX
from .image_checks import Share
from .loader import build_dataloader, pad_fraction
from .registry import DATASETS, adopt_dataset_template, check_data_source, load_split
from .sampler import GlobalBatchSampler
from .split import DataReport, TokenizedSplit

__all__ = ["DATASETS", "IGNORE_INDEX", "DataReport", "GlobalBatchSampler", "Share", "TokenizedSplit",
           "adopt_dataset_template", "build_dataloader", "check_data_source", "load_split", "pad_fraction"]
