"""QLoRA's 4-bit base built on the meta device and quantized tensor by tensor (``--low_cpu_fsdp``)
is the model ``from_pretrained(quantization_config=...)`` builds, to the bit; and the bitsandbytes
switch ``keep_packed_layout`` relies on still exists."""

from __future__ import annotations

import warnings

import pytest
import torch

pytest.importorskip("bitsandbytes")

from shardtune.config.configs import quantization_config  # noqa: E402
from shardtune.model.loading import load_model  # noqa: E402
from shardtune.model.low_cpu import build_meta_model, materialize_and_load  # noqa: E402
from shardtune.model.quantization import bnb_config, keep_packed_layout, prepare_for_training  # noqa: E402


@pytest.mark.parametrize("q", [
    quantization_config(quant_type="fp4", compute_dtype="float32", quant_storage="float32"),
    quantization_config(quant_type="nf4", use_double_quant=True, compute_dtype="float32", quant_storage="bfloat16"),
], ids=["fp4-fp32-storage", "nf4-double-quant-bf16-storage"])
def test_meta_built_4bit_model_equals_from_pretrained_bit_for_bit(tiny_model_dir, q):
    config = bnb_config("4bit", q)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference = prepare_for_training(load_model(str(tiny_model_dir), dtype=torch.float32, attn="sdpa",
                                                    device=torch.device("cpu"), quantization=config))
        meta = prepare_for_training(build_meta_model(str(tiny_model_dir), dtype=torch.float32, attn="sdpa",
                                                     quantization=config))
    assert meta.lm_head.__class__ is torch.nn.Linear  # the head stays unquantized, as transformers keeps it
    materialize_and_load(meta, str(tiny_model_dir), torch.device("cpu"), seed=0, weights_dtype=torch.float32)
    ref_params, meta_params = dict(reference.named_parameters()), dict(meta.named_parameters())
    assert ref_params.keys() == meta_params.keys()
    for name, p in ref_params.items():  # packed 4-bit bytes compared as bytes (as floats some are NaN)
        assert torch.equal(p.detach().view(torch.uint8), meta_params[name].detach().view(torch.uint8)), name
    ids = torch.tensor([[1, 17, 42, 99, 5, 230, 7]])
    keep_packed_layout(reference)
    keep_packed_layout(meta)
    with torch.no_grad():
        torch.testing.assert_close(meta(ids).logits, reference(ids).logits, rtol=0, atol=0)


def test_the_bitsandbytes_repacking_switch_exists():
    """``keep_packed_layout`` turns off bitsandbytes' CPU repacking through this attribute; if a
    bitsandbytes release renames it, training after an evaluation breaks silently on AVX512-BF16
    CPUs (TRAPS): fail here instead."""
    from bitsandbytes.nn import Linear4bit

    layer = Linear4bit(8, 8, bias=False, compute_dtype=torch.float32, quant_type="nf4")
    assert hasattr(layer, "support_avx512bf16_for_cpu")
    keep_packed_layout(torch.nn.Sequential(layer))
    assert layer.support_avx512bf16_for_cpu is False
