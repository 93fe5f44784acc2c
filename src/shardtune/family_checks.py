"""Options a model family cannot honour, refused before any work starts (never silently ignored).

Below the recipe so that every command that takes the training flags (``shardtune finetune`` and
``shardtune data``) refuses the same ones with the same words: the dataset's own check
(``data.registry``) and the family's option rules (``config.validate.check_family_options``).
"""

from __future__ import annotations

from .config import Config
from .config.validate import check_family_options
from .data.registry import check_dataset_for_model
from .model.family import ModelFamily


def refuse_for_family(cfg: Config, family: ModelFamily) -> None:
    """The dataset and the options that this model family cannot honour."""
    check_dataset_for_model(cfg.train.dataset, family.is_vision, cfg.train.model_name)
    check_family_options(cfg, family.is_vision, family.name)
