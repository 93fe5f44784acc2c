"""One adapter per model family: everything that differs between Llama text models and Llama 3.2
Vision (Mllama) lives here, and nowhere else tests ``model_type``.

A family knows:

* the model class to load and build (``AutoModelForCausalLM`` / ``MllamaForConditionalGeneration``)
  and whether its inputs come from a processor (image processor + tokenizer) or a tokenizer;
* its FSDP units and activation-checkpointing units (the decoder blocks of every tower);
* its language-model decoder layers (what ``--num_freeze_layers`` counts) and its freeze groups
  (``--freeze_LLM_only``: the whole language model but its cross-attention layers;
  ``--freeze_vision_tower``: the vision encoder and projector);
* its default LoRA targets (the language model's attention projections);
* its Hugging Face state-dict names across versions (``legacy_renames``: names older
  transformers releases wrote, used where this version has no conversion mapping). The names
  that do not depend on the family (PEFT's ``base_model.model.`` / ``.base_layer.``) are in
  ``model/names.py``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Callable

import torch.nn as nn

from ..config.errors import ConfigError, ShardtuneError


@dataclass(frozen=True)
class ModelFamily:
    name: str
    model_types: tuple[str, ...]
    # Class names of the blocks that are FSDP units and activation-checkpointing units.
    decoder_layer_classes: tuple[str, ...]
    # The language model's decoder layers, in order (what num_freeze_layers counts).
    text_layers: Callable[[nn.Module], list[nn.Module]]
    # ``transformers`` class that loads a checkpoint of this family; None: AutoModelForCausalLM.
    model_class_name: str | None = None
    # Inputs come from an AutoProcessor (images + text) rather than a tokenizer.
    uses_processor: bool = False
    # freeze group name -> the parameters it holds (by parameter name).
    freeze_groups: dict[str, Callable[[nn.Module], set[str]]] = field(default_factory=dict)
    # (pattern, replacement) from older transformers names to this version's (4.x fallback).
    legacy_renames: tuple[tuple[str, str], ...] = ()
    # Module holding the language model: plain LoRA target names (q_proj) apply inside it only.
    language_model_module: str | None = None
    # Keys every training batch must carry (Mllama skips its vision side for a batch without images).
    required_batch_keys: tuple[str, ...] = ()
    # The image part of a probe (model/probes.py): (config, token ids, seed, embedding rows) -> the
    # image tensors (it may set the first token to the image token); None for text models.
    image_probe: Callable | None = None

    @property
    def is_vision(self) -> bool:
        return self.uses_processor

    def model_class(self) -> type:
        import transformers

        return getattr(transformers, self.model_class_name or "AutoModelForCausalLM")

    def lora_targets(self, names, model: nn.Module | None = None):
        """peft ``target_modules`` for the user's names: plain names (``q_proj``) target the language
        model only (a vision tower has ``q_proj`` layers too); ``all-linear``, a regex string or a
        list with dotted names (``self_attn.q_proj``) go to peft as given, over the whole model.
        With ``model``, a plain name that names no module of the language model is refused (it
        would otherwise be dropped without a word)."""
        scope = self.language_model_module
        if scope is None or isinstance(names, str) or any("." in n for n in names):
            return names
        if model is not None:
            inside = {n.rsplit(".", 1)[-1] for n, _ in model.named_modules() if f"{scope}." in f"{n}."}
            outside = {n.rsplit(".", 1)[-1] for n, _ in model.named_modules()}
            for name in names:
                if name not in inside:
                    where = ("it names modules outside the language model (the vision tower); target them "
                             f"with a dotted name such as mlp.{name} or self_attn.{name}, which peft matches "
                             "over the whole model" if name in outside else "no module has that name")
                    raise ConfigError(
                        f"--lora_config.target_modules {name!r}: plain names target the language model of "
                        f"this {self.name} model, and it has no {name!r} module; {where}.")
        alternatives = "|".join(re.escape(n) for n in names)
        return rf"(?:.*\.)?{re.escape(scope)}\..*\.({alternatives})"

    def params_of(self, model: nn.Module, group: str) -> set[str]:
        if group not in self.freeze_groups:
            raise ConfigError(f"{self.name} models have no {group!r} part to freeze.")
        return self.freeze_groups[group](model)


def _llama_layers(model: nn.Module) -> list[nn.Module]:
    return list(_find_attr(model, "layers"))


def _mllama_text_layers(model: nn.Module) -> list[nn.Module]:
    return list(_find_submodule(model, "language_model").layers)


def _find_attr(model: nn.Module, attr: str):
    for module in model.modules():
        value = getattr(module, attr, None)
        if isinstance(value, nn.ModuleList):
            return value
    raise ShardtuneError(f"Could not find the decoder layers ({attr}) in {type(model).__name__}.")


def _find_submodule(model: nn.Module, name: str) -> nn.Module:
    for mod_name, module in model.named_modules():
        if mod_name.split(".")[-1] == name:
            return module
    raise ShardtuneError(f"Could not find submodule {name!r} in {type(model).__name__}.")


def _params_under(model: nn.Module, keep: Callable[[str, nn.Module], bool]) -> set[str]:
    """Names of parameters (full names, as ``named_parameters`` gives them) of modules ``keep`` picks."""
    out: set[str] = set()
    for mod_name, module in model.named_modules():
        if keep(mod_name, module):
            out.update(f"{mod_name}.{p}" if mod_name else p for p, _ in module.named_parameters())
    return out


def _mllama_language_model(model: nn.Module) -> set[str]:
    """llama-recipes' freeze_LLM_only: every language-model weight (embeddings, self-attention
    decoder layers, final norm, LM head) except the cross-attention decoder layers."""
    cross = _params_under(model, lambda _, m: type(m).__name__ == "MllamaCrossAttentionDecoderLayer")
    text = _params_under(model, lambda n, _: n.split(".")[-1] in ("language_model", "lm_head"))
    return text - cross


def _mllama_vision_tower(model: nn.Module) -> set[str]:
    return _params_under(model, lambda n, _: n.split(".")[-1] in ("vision_model", "multi_modal_projector"))


def _mllama_image_probe(config, ids: list[int], seed: int, embedding_rows: int) -> dict:
    """Seeded noise as one image of one tile that every token attends to; the first token becomes
    the image token where the embeddings have it."""
    import torch

    vision, tokens = config.vision_config, len(ids)
    if config.image_token_index < embedding_rows:
        ids[0] = config.image_token_index
    tiles, size = vision.max_num_tiles, vision.image_size
    g = torch.Generator().manual_seed(seed)
    aspect_ratio_mask = torch.zeros(1, 1, tiles, dtype=torch.long)
    aspect_ratio_mask[..., 0] = 1
    cross_attention_mask = torch.zeros(1, tokens, 1, tiles, dtype=torch.long)
    cross_attention_mask[..., 0] = 1
    return {"pixel_values": torch.randn(1, 1, tiles, vision.num_channels, size, size, generator=g),
            "aspect_ratio_ids": torch.ones(1, 1, dtype=torch.long), "aspect_ratio_mask": aspect_ratio_mask,
            "cross_attention_mask": cross_attention_mask}


FAMILIES = (
    ModelFamily(
        name="llama",
        model_types=("llama", "mistral", "qwen2", "qwen3"),
        decoder_layer_classes=("LlamaDecoderLayer", "MistralDecoderLayer", "Qwen2DecoderLayer",
                               "Qwen3DecoderLayer"),
        text_layers=_llama_layers,
    ),
    ModelFamily(
        name="mllama",
        model_types=("mllama",),
        # Vision encoder layers (local and global transformer) and both kinds of text layers.
        decoder_layer_classes=("MllamaSelfAttentionDecoderLayer", "MllamaCrossAttentionDecoderLayer",
                               "MllamaVisionEncoderLayer"),
        text_layers=_mllama_text_layers,
        model_class_name="MllamaForConditionalGeneration",
        uses_processor=True,
        freeze_groups={"language_model": _mllama_language_model, "vision_tower": _mllama_vision_tower},
        language_model_module="language_model",
        required_batch_keys=("pixel_values",),
        image_probe=_mllama_image_probe,
        # transformers < 5 layout (what llama-recipes checkpoints of 2024/25 hold).
        legacy_renames=((r"^language_model\.lm_head\.", "lm_head."),
                        (r"^language_model\.model\.", "model.language_model."),
                        (r"^vision_model\.", "model.vision_model."),
                        (r"^multi_modal_projector\.", "model.multi_modal_projector.")),
    ),
)


def family_for_type(model_type: str | None) -> ModelFamily:
    for family in FAMILIES:
        if model_type in family.model_types:
            return family
    supported = ", ".join(t for f in FAMILIES for t in f.model_types)
    raise ShardtuneError(f"Model type {model_type!r} is not supported; supported types: {supported}.")


def family_for_config(config) -> ModelFamily:
    return family_for_type(getattr(config, "model_type", None))


def family_of(model: nn.Module) -> ModelFamily:
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    base = getattr(model, "get_base_model", None)  # PEFT wrappers keep the HF config on the base
    if model_type is None and base is not None:
        model_type = getattr(base().config, "model_type", None)
    return family_for_type(model_type)


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """Every module whose class the family table lists as a decoder block, outermost first."""
    classes = family_of(model).decoder_layer_classes
    return [m for m in model.modules() if type(m).__name__ in classes]


def legacy_rename_rules(model_type: str) -> list[tuple[re.Pattern, str]]:
    """Compiled (pattern, replacement) rules from a family's older transformers names."""
    try:
        family = family_for_type(model_type)
    except ShardtuneError:
        return []
    return [(re.compile(p), r) for p, r in family.legacy_renames]
