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


def prepare_for_training(model: torch.nn.Module) -> torch.nn.Module:
    """Freeze the quantized base and keep its unquantized layers in fp32 (peft's k-bit recipe)."""
    from peft import prepare_model_for_kbit_training

    return prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
