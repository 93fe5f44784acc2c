"""Options a model family cannot honour, refused before any work starts (never silently ignored).

Below the recipe so that every command that takes the training flags (``shardtune finetune`` and
``shardtune data``) refuses the same ones with the same words.
"""

from __future__ import annotations

from .config import Config, ShardtuneError
from .data.registry import check_dataset_for_model
from .model.family import ModelFamily


def check_family_options(cfg: Config, family: ModelFamily) -> None:
    """Options that this model family cannot honour are refused, never silently ignored."""
    t = cfg.train
    check_dataset_for_model(t.dataset, family.is_vision, t.model_name)
    if family.is_vision and t.batching_strategy.value == "packing":
        raise ShardtuneError(
            f"--batching_strategy packing is not available for vision models ({family.name}): a packed row "
            "would join several samples' images and text, and each image must stay with its own "
            "text. Pass --batching_strategy padding (as llama-recipes' vision examples do).")
    if family.is_vision and t.quantization:
        raise ShardtuneError(
            f"--quantization (QLoRA) is not supported for vision models ({family.name}) yet. Use LoRA "
            "without --quantization (--use_peft --peft_method lora), or --freeze_LLM_only.")
    if family.is_vision and t.use_peft and t.peft_method.value == "llama_adapter":
        raise ShardtuneError(
            "--peft_method llama_adapter is for text models: peft's LLaMA-Adapter wraps Llama's "
            "self-attention and does not know Llama 3.2 Vision's. Use --peft_method lora.")
    for flag, on in (("--freeze_LLM_only", t.freeze_LLM_only), ("--freeze_vision_tower", t.freeze_vision_tower)):
        if on and not family.is_vision:
            raise ShardtuneError(
                f"{flag} is for vision models (Llama 3.2 Vision / Mllama), which have a language model and a "
                "vision tower to freeze separately; this model has none. Use --freeze_layers or --use_peft.")
        if on and t.use_peft:  # peft freezes every base weight: the parts the flag keeps would not train
            raise ShardtuneError(
                f"{flag} chooses which base weights train, but --use_peft freezes all of them and trains only "
                "the adapter, so the flag would change nothing. Use one or the other (a LoRA can reach "
                "the vision tower through --lora_config.target_modules with dotted names: docs/vision.md).")
