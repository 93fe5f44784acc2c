"""QLoRA's base model: loaded in 4 or 8 bits through bitsandbytes (llama-recipes' ``--quantization``).

The fields are llama-recipes' ``quantization_config``: 4-bit ``quant_type`` (fp4 / nf4),
``compute_dtype`` (the dtype the dequantized matmuls run in), ``use_double_quant`` and
``quant_storage``. 8-bit uses LLM.int8 and ignores them, as in llama-recipes. The quantized base
is frozen; peft's ``prepare_model_for_kbit_training`` keeps the layers that stay unquantized
(norms, embeddings) in fp32 for stable training, as peft's QLoRA recipe does.
"""

from __future__ import annotations

import torch

from ..config.configs import quantization_config

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def bnb_config(bits: str, q: quantization_config):
    """The transformers ``BitsAndBytesConfig`` for ``--quantization 4bit|8bit``."""
    from transformers import BitsAndBytesConfig

    if bits == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=q.quant_type,
                              bnb_4bit_compute_dtype=DTYPES[q.compute_dtype],
                              bnb_4bit_use_double_quant=q.use_double_quant,
                              bnb_4bit_quant_storage=DTYPES[q.quant_storage])


def quantize_on_meta(model: torch.nn.Module, config) -> None:
    """Give a meta-device model the 4-bit layers ``from_pretrained(quantization_config=config)``
    would give it (``--low_cpu_fsdp``), through transformers' own quantizer so the same layers are
    converted (``lm_head`` stays unquantized).

    Each 4-bit weight takes its packed shape and storage dtype here, before FSDP shards it; its
    bytes and quant state arrive later from ``quantized_weight``, when the rank loads its rows."""
    from bitsandbytes.nn import Linear4bit, Params4bit
    from transformers.quantizers import AutoHfQuantizer

    quantizer = AutoHfQuantizer.from_config(config, pre_quantized=False)
    quantizer.preprocess_model(model, dtype=model.dtype, device_map={"": "meta"})
    model.hf_quantizer = quantizer
    for module in model.modules():
        if isinstance(module, Linear4bit):
            w = module.weight
            # bitsandbytes packs two 4-bit values a byte, in an (n, 1) tensor of quant_storage.
            rows = (w.numel() + 1) // (2 * w.quant_storage.itemsize)
            module.weight = Params4bit(torch.empty(rows, 1, dtype=w.quant_storage, device="meta"),
                                       requires_grad=False, blocksize=w.blocksize,
                                       compress_statistics=w.compress_statistics, quant_type=w.quant_type,
                                       quant_storage=w.quant_storage, bnb_quantized=True, module=module)
    quantizer.postprocess_model(model)


def is_quantized_layer(module: torch.nn.Module) -> bool:
    from bitsandbytes.nn import Linear4bit

    return isinstance(module, Linear4bit)


def quantized_weight(module: torch.nn.Module, weight: torch.Tensor, config, *, device: torch.device,
                     dtype: torch.dtype) -> torch.Tensor:
    """The packed 4-bit bytes of a whole checkpoint ``weight`` for the 4-bit layer ``module``.

    Quantized exactly as ``from_pretrained`` does with the ``BitsAndBytesConfig`` ``config``: cast
    to the model dtype, then bitsandbytes' ``Params4bit`` quantizes as it moves to ``device``. The
    layer keeps the quant state (``module.quant_state``); bitsandbytes reattaches it to the weight
    FSDP gathers, in forward."""
    from bitsandbytes.nn import Params4bit

    if tuple(weight.shape) != (module.out_features, module.in_features):
        raise ValueError(f"shape {tuple(weight.shape)} for a {module.out_features}x{module.in_features} layer")
    packed = Params4bit(weight.to(dtype), requires_grad=False, compress_statistics=config.bnb_4bit_use_double_quant,
                        quant_type=config.bnb_4bit_quant_type, quant_storage=config.bnb_4bit_quant_storage,
                        module=module).to(device)
    return packed.data


def keep_packed_layout(model: torch.nn.Module) -> None:
    """Keep every 4-bit layer's weight in the layout FSDP shards and gathers.

    On CPUs with AVX512-BF16, bitsandbytes rewrites a 4-bit weight in place into a CPU-specific
    packing the first time the layer runs in eval mode without gradients (evaluation,
    generation), an inference speed-up that training must not get:

    * in one process, training after the first evaluation went wrong (measured here: the loss
      stopped falling and the next evaluation gave the same loss to the last digit);
    * under FSDP the rewrite lands in the gathered copy while the shards keep the old layout, so
      the next gather pairs old bytes with the new layout's quant state.

    The switch is the layer's own ``support_avx512bf16_for_cpu`` setting."""
    from bitsandbytes.nn import Linear4bit

    for module in model.modules():
        if isinstance(module, Linear4bit):
            module.support_avx512bf16_for_cpu = False


def check_storage_for_fsdp(q: quantization_config, fsdp_dtype: torch.dtype) -> None:
    """FSDP casts every parameter it gathers to its compute dtype; a 4-bit weight's packed bytes
    survive only if they are already stored in it (``quant_storage``), or the bytes would be
    converted as if they were numbers."""
    from ..config.errors import ConfigError

    if DTYPES[q.quant_storage] != fsdp_dtype:
        want = str(fsdp_dtype).removeprefix("torch.")
        raise ConfigError(
            f"--quantization under FSDP needs the 4-bit weights stored in the dtype FSDP computes in ({want} "
            f"for this run), but --quantization_config.quant_storage is {q.quant_storage}: FSDP would convert "
            f"the packed bytes as numbers. Pass --quantization_config.quant_storage {want}.")


def prepare_for_training(model: torch.nn.Module) -> torch.nn.Module:
    """Freeze the quantized base and keep its unquantized layers in fp32 (peft's k-bit recipe)."""
    from peft import prepare_model_for_kbit_training

    return prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
