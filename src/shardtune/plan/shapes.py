"""The model the planner reasons about: every parameter's shape, dtype, FSDP unit and whether it
trains, plus the decoder's hyper-parameters that the activation formula needs.

The parameters come from the real thing, not from a formula: the model's class is built on the
meta device from its config (``model/meta.py``, no memory), the run's freezing and PEFT options
are applied with the recipe's own functions (so LoRA's adapter shapes, tied embeddings,
``modules_to_save``, DoRA and peft's fp32 adapters are whatever peft makes of them), and the FSDP
units are the family table's decoder layers plus the root, as ``parallel/fsdp.py`` shards them.
A 4-bit (QLoRA) base cannot be built on the meta device, so its quantized linears are rewritten to
bitsandbytes' packed layout here (``_quantize_4bit``).

The model is a ``--model_name`` (an HF directory or hub id: only ``config.json`` is read) or a
``--size`` from :data:`LLAMA3_SIZES`, the published Llama 3.1 / 3.2 shapes.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Optional

import torch

from ..config import Config, ConfigError, ShardtuneError

# The published Llama 3.x text models (config.json of meta-llama/Llama-3.2-1B, -3B, Llama-3.1-8B,
# -70B, -405B). Only what changes memory or FLOPs is listed; rope scaling changes neither.
LLAMA3_SIZES: dict[str, dict] = {
    "1b": dict(name="Llama-3.2-1B", hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
               num_attention_heads=32, num_key_value_heads=8, head_dim=64, tie_word_embeddings=True),
    "3b": dict(name="Llama-3.2-3B", hidden_size=3072, intermediate_size=8192, num_hidden_layers=28,
               num_attention_heads=24, num_key_value_heads=8, head_dim=128, tie_word_embeddings=True),
    "8b": dict(name="Llama-3.1-8B", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
               num_attention_heads=32, num_key_value_heads=8, head_dim=128, tie_word_embeddings=False),
    "70b": dict(name="Llama-3.1-70B", hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                num_attention_heads=64, num_key_value_heads=8, head_dim=128, tie_word_embeddings=False),
    "405b": dict(name="Llama-3.1-405B", hidden_size=16384, intermediate_size=53248, num_hidden_layers=126,
                 num_attention_heads=128, num_key_value_heads=8, head_dim=128, tie_word_embeddings=False),
}
_LLAMA3_COMMON = dict(vocab_size=128256, max_position_embeddings=131072, rms_norm_eps=1e-5,
                      rope_theta=500000.0, bos_token_id=128000, eos_token_id=128001)

# Module names inside a Llama decoder layer that the activation formula distinguishes.
ATTN_IN = ("q_proj", "k_proj", "v_proj")
MLP_IN = ("gate_proj", "up_proj")
LAYER_LINEARS = (*ATTN_IN, "o_proj", *MLP_IN, "down_proj")
LAYER_NORMS = ("input_layernorm", "post_attention_layernorm")

DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.uint8: "uint8",
               torch.int8: "int8", torch.float64: "fp64"}


@dataclass(frozen=True)
class ParamSpec:
    """One parameter as FSDP sees it: the tensor it shards on dim 0 (a 4-bit weight's packed
    storage, not its logical shape), in the dtype it is stored in."""

    name: str
    shape: tuple[int, ...]
    itemsize: int
    trainable: bool
    unit: int  # FSDP unit: 0 is the root (embeddings, final norm, head), i >= 1 is decoder block i - 1
    logical_numel: int = 0  # parameters it stands for (a packed 4-bit weight holds two per byte)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * self.itemsize


@dataclass(frozen=True)
class LoraModule:
    """A LoRA adapter on a linear layer: rank, input width and whether its dropout is active
    (peft replaces p = 0 by an identity, which then saves no copy of the input)."""

    r: int
    in_features: int
    out_features: int
    dropout: bool


@dataclass(frozen=True)
class LayerGrads:
    """What trains in one decoder layer: base weights by short module name (``q_proj``,
    ``input_layernorm``, ...) and LoRA adapters by the short name of the layer they wrap."""

    trainable: frozenset[str]
    lora: dict[str, LoraModule] = field(default_factory=dict)


@dataclass
class ModelShapes:
    name: str
    model_type: str
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    tied: bool
    params: list[ParamSpec]
    layer_grads: list[LayerGrads]
    embed_trainable: bool
    final_norm_trainable: bool
    head_trainable: bool  # the LM head's weight (or a LoRA on it) trains, so it keeps its input
    head_lora: Optional[LoraModule]
    quant_state_bytes: int = 0  # bitsandbytes' absmax etc.: not a parameter, so every rank holds all of it
    quantized: Optional[str] = None  # "4bit" | "8bit" | None

    @property
    def total_params(self) -> int:
        return sum(p.logical_numel or p.numel for p in self.params)

    @property
    def trainable_params(self) -> int:
        return sum(p.numel for p in self.params if p.trainable)

    def unit_params(self, unit: int) -> list[ParamSpec]:
        return [p for p in self.params if p.unit == unit]

    @property
    def units(self) -> list[int]:
        return sorted({p.unit for p in self.params})


def size_config(size: str):
    """The transformers config of a Llama 3.x size (``--size 8b``)."""
    from transformers import LlamaConfig

    key = size.strip().lower()
    if key not in LLAMA3_SIZES:
        raise ConfigError(f"--size must be one of {', '.join(LLAMA3_SIZES)} (the Llama 3.1 / 3.2 text models); "
                          f"got {size!r}. For another model pass --model_name with its HF directory or hub id.")
    spec = {k: v for k, v in LLAMA3_SIZES[key].items() if k != "name"}
    config = LlamaConfig(**_LLAMA3_COMMON, **spec)
    config.name_or_path = LLAMA3_SIZES[key]["name"]
    return config


def model_config(model_name: str):
    """``config.json`` of ``--model_name`` (a local directory, or a hub id when online)."""
    from ..model.loading import load_config

    return load_config(model_name)


def _text_config(config):
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def build_shapes(config, cfg: Config) -> ModelShapes:
    """Every parameter of the run's model, after freezing and PEFT, grouped by FSDP unit."""
    from ..model.family import decoder_layers, family_for_config
    from ..model.meta import build_meta_model

    family = family_for_config(config)
    if family.is_vision:
        raise ShardtuneError(
            f"shardtune plan models text decoders (Llama family); {family.name} (Llama 3.2 Vision) has a vision "
            "tower and cross-attention layers it does not estimate yet. Plan its language model with "
            "--size or a text model's --model_name.")
    t = cfg.train
    # The dtype the weights are stored in (runtime.training_dtype); QLoRA keeps its unquantized
    # layers in fp32 (peft's prepare_model_for_kbit_training), whatever the flags say.
    dtype = torch.bfloat16 if cfg.fsdp.pure_bf16 and not t.quantization else torch.float32
    with warnings.catch_warnings():  # transformers' and peft's deprecation notes are not the user's business
        warnings.simplefilter("ignore")
        model = build_meta_model(config, dtype=dtype)
        if t.freeze_layers:
            from ..model.freeze import freeze_first_layers

            freeze_first_layers(model, t.num_freeze_layers)
        if t.use_peft:
            model = _with_peft(model, cfg)
    blocks = decoder_layers(model)
    unit_of: dict[int, int] = {}
    for i, block in enumerate(blocks):
        for p in block.parameters():
            unit_of.setdefault(id(p), i + 1)
    params = [ParamSpec(name, tuple(p.shape), p.element_size(), p.requires_grad, unit_of.get(id(p), 0))
              for name, p in model.named_parameters()]
    quant_state = 0
    if t.quantization:
        params, quant_state = _quantize(params, model, t.quantization, cfg.quantization)
    return _describe(config, model, blocks, params, quant_state, t.quantization)


def _with_peft(model, cfg: Config):
    from ..model.peft import apply_peft

    try:
        # peft builds each adapter's layers on the default device and only then moves them to the
        # base layer's (meta) device: created on the meta device instead, no adapter tensor is ever
        # allocated or initialised (a LoRA of rank 100,000 on an 8B model would be 210 GB).
        with torch.device("meta"):
            return apply_peft(model, cfg)
    except ValueError as exc:  # peft's own message, e.g. a target module the model does not have
        raise ConfigError(f"PEFT options do not fit this model: {str(exc)[:400]}") from None


def _short(name: str) -> str:
    """``model.layers.3.self_attn.q_proj.base_layer.weight`` -> ``q_proj``."""
    parts = [p for p in name.split(".") if p not in ("weight", "bias", "base_layer", "default")]
    return parts[-1] if parts else name


def _lora_of(module) -> Optional[LoraModule]:
    """The LoRA adapter peft put on ``module`` (its active adapter), or None."""
    lora_a = getattr(module, "lora_A", None)
    if not lora_a:
        lora_emb = getattr(module, "lora_embedding_A", None)
        if not lora_emb:
            return None
        key = next(iter(lora_emb))
        a = lora_emb[key]
        return LoraModule(r=a.shape[0], in_features=a.shape[1], out_features=module.lora_embedding_B[key].shape[0],
                          dropout=False)  # an embedding adapter gathers rows; there is no dropout copy
    key = next(iter(lora_a))
    a = lora_a[key]
    drop = module.lora_dropout[key]
    return LoraModule(r=a.out_features, in_features=a.in_features, out_features=module.lora_B[key].out_features,
                      dropout=isinstance(drop, torch.nn.Dropout) and drop.p > 0)


def _layer_grads(block) -> LayerGrads:
    trainable = set()
    lora: dict[str, LoraModule] = {}
    for mod_name, module in block.named_modules():
        short = mod_name.split(".")[-1]
        adapter = _lora_of(module)
        if adapter is not None and short in LAYER_LINEARS:
            lora[short] = adapter
        direct = [p for n, p in module.named_parameters(recurse=False) if p.requires_grad]
        base = getattr(module, "base_layer", None)
        if base is not None:
            direct += [p for p in base.parameters(recurse=False) if p.requires_grad]
        if direct and short in (*LAYER_LINEARS, *LAYER_NORMS):
            trainable.add(short)
    return LayerGrads(frozenset(trainable), lora)


def _describe(config, model, blocks, params: list[ParamSpec], quant_state: int, quantized) -> ModelShapes:
    text = _text_config(config)
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    embed, head = base.get_input_embeddings(), base.get_output_embeddings()
    heads = text.num_attention_heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    trains = lambda part: any(p.trainable and f".{part}." in f".{p.name}" for p in params)  # noqa: E731
    head_lora = next((_lora_of(m) for n, m in model.named_modules()
                      if n.split(".")[-1] == "lm_head" and _lora_of(m) is not None), None)
    tied = bool(head is not None and getattr(head, "weight", None) is embed.weight)
    return ModelShapes(
        name=getattr(config, "name_or_path", "") or getattr(text, "model_type", "model"),
        model_type=text.model_type, hidden=text.hidden_size, layers=text.num_hidden_layers, heads=heads,
        kv_heads=getattr(text, "num_key_value_heads", None) or heads, head_dim=head_dim,
        intermediate=text.intermediate_size, vocab=text.vocab_size, tied=tied, params=params,
        layer_grads=[_layer_grads(b) for b in blocks],
        embed_trainable=trains("embed_tokens"),
        final_norm_trainable=any(p.trainable and p.unit == 0 and _short(p.name) == "norm" for p in params),
        # the head keeps its input for backward when its weight (tied or not), a copy of it
        # (modules_to_save) or a LoRA on it trains
        head_trainable=trains("lm_head") or (tied and trains("embed_tokens")),
        head_lora=head_lora, quant_state_bytes=quant_state, quantized=quantized)


# ------------------------------------------------------------------------ QLoRA's base


def _quantize(params: list[ParamSpec], model, bits: str, qcfg) -> tuple[list[ParamSpec], int]:
    """The frozen linears bitsandbytes replaces (every ``nn.Linear`` of the base but the LM head,
    as transformers' ``get_keys_to_not_convert`` decides), in their stored layout; the rest stays
    fp32. Returns the new specs and the bytes of quantization state each rank holds in full."""
    from ..model.quantization import DTYPES

    linear_weights = set()
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    head = base.get_output_embeddings()
    for name, module in model.named_modules():
        adapter_part = any(part in name for part in ("lora_A", "lora_B", "modules_to_save"))
        if isinstance(module, torch.nn.Linear) and module is not head and not adapter_part:
            linear_weights.add(f"{name}.weight")
    out, state = [], 0
    storage = DTYPES[qcfg.quant_storage]
    for p in params:
        if p.name not in linear_weights:
            out.append(p)
            continue
        n = p.numel
        if bits == "4bit":
            per_elem = torch.empty((), dtype=storage).element_size()
            mod = 2 * per_elem  # bitsandbytes.functional.quantize_4bit: ((n + 1) // mod, 1) in quant_storage
            out.append(ParamSpec(p.name, ((n + 1) // mod, 1), per_elem, False, p.unit, logical_numel=n))
            state += quant_state_4bit(n, qcfg.use_double_quant)
        else:  # LLM.int8: int8 weights of the same shape and one fp32 scale per output row
            out.append(ParamSpec(p.name, p.shape, 1, False, p.unit, logical_numel=n))
            state += p.shape[0] * 4
    return out, state


def quant_state_4bit(n: int, double_quant: bool, blocksize: int = 64) -> int:
    """Bytes of bitsandbytes' 4-bit quantization state for a weight of ``n`` elements: the 16-value
    fp32 fp4/nf4 code and one fp32 absmax per block of 64, or with double quantization one uint8
    per block plus one fp32 absmax per 256 blocks and their 256-entry fp32 code."""
    blocks = -(-n // blocksize)
    if not double_quant:
        return blocks * 4 + 16 * 4
    return blocks + -(-blocks // 256) * 4 + 256 * 4 + 16 * 4
