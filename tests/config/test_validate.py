"""config/validate.py's family refusals: what a model family cannot honour is refused by name."""

from __future__ import annotations

import pytest

from shardtune.config import ShardtuneError, parse_args
from shardtune.config.validate import check_family_options


def _cfg(*flags: str):
    return parse_args(["--model_name", "m", *flags]).config


PADDING = ("--batching_strategy", "padding")  # the default, packing, is refused for vision models


def test_vision_only_and_text_only_options_are_refused_for_the_other_family():
    check_family_options(_cfg("--batching_strategy", "packing"), False, "llama")  # a text model packs
    check_family_options(_cfg("--freeze_LLM_only", "True", *PADDING), True, "mllama")
    with pytest.raises(ShardtuneError, match=r"packing is not available for vision models \(mllama\)"):
        check_family_options(_cfg("--batching_strategy", "packing"), True, "mllama")
    with pytest.raises(ShardtuneError, match="--freeze_vision_tower is for vision models"):
        check_family_options(_cfg("--freeze_vision_tower", "True"), False, "llama")
    with pytest.raises(ShardtuneError, match="llama_adapter is for text models"):
        check_family_options(_cfg("--use_peft", "--peft_method", "llama_adapter", *PADDING), True, "mllama")
    with pytest.raises(ShardtuneError, match="--freeze_LLM_only chooses which base weights train"):
        check_family_options(_cfg("--freeze_LLM_only", "True", "--use_peft", *PADDING), True, "mllama")
