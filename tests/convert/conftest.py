"""Fixtures for the conversion tests: rank-written checkpoints (one torchrun launch per session),
a tiny Mllama, and helpers that compare a converted folder with a reference model."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).parent
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}


def load_weights(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    files = sorted(folder.glob("*.safetensors"))
    out: dict[str, torch.Tensor] = {}
    for f in files:
        out.update(load_file(str(f)))
    return out


PROBE = torch.tensor([[1, 17, 42, 99, 5, 230, 7, 64, 300, 11, 2, 150]])


@torch.no_grad()
def logits_of(model: torch.nn.Module, ids: torch.Tensor = PROBE) -> torch.Tensor:
    model.eval()
    return model(input_ids=ids, use_cache=False).logits.float()


def hf_logits(folder: Path, cls=None) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = (cls or AutoModelForCausalLM).from_pretrained(folder, dtype=torch.float32)
    return logits_of(model)


@pytest.fixture
def same_weights():
    """assert_same(dst_folder, reference: dict | folder, atol=0): every tensor equal, same names."""

    def check(dst: Path, reference, atol: float = 0.0, dtype=None) -> None:
        got = load_weights(dst)
        want = reference if isinstance(reference, dict) else load_weights(Path(reference))
        assert set(got) == set(want), (sorted(set(got) ^ set(want)))[:10]
        for name, tensor in want.items():
            expected = tensor.to(dtype) if dtype is not None else tensor
            assert got[name].dtype == expected.dtype, name
            if atol:
                torch.testing.assert_close(got[name], expected, atol=atol, rtol=0, msg=name)
            else:
                assert torch.equal(got[name], expected), name

    return check


def tiny_mllama_config(vocab_size: int, bos: int, eos: int, pad: int):
    from transformers import MllamaConfig

    return MllamaConfig(
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_global_layers=1,
                           attention_heads=2, image_size=28, patch_size=14, max_num_tiles=2, vision_output_dim=64,
                           intermediate_layers_indices=[0], supported_aspect_ratios=[[1, 1], [1, 2], [2, 1]]),
        text_config=dict(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2, cross_attention_layers=[1],
                         max_position_embeddings=128, bos_token_id=bos, eos_token_id=eos, pad_token_id=pad))


@pytest.fixture(scope="session")
def tiny_mllama_dir(tmp_path_factory) -> Path:
    """A random tiny Llama 3.2 Vision (Mllama) HF folder, saved by this transformers version."""
    from transformers import MllamaForConditionalGeneration

    from shardtune.demo.tiny import build_tokenizer

    path = tmp_path_factory.mktemp("tiny-mllama")
    tok = build_tokenizer()
    torch.manual_seed(3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = MllamaForConditionalGeneration(tiny_mllama_config(len(tok), tok.bos_token_id, tok.eos_token_id,
                                                                  tok.pad_token_id))
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def helpers():
    """load_weights(folder), logits_of(model), hf_logits(folder, cls=None), PROBE."""
    from types import SimpleNamespace

    return SimpleNamespace(load_weights=load_weights, logits_of=logits_of, hf_logits=hf_logits, PROBE=PROBE,
                           tiny_mllama_config=tiny_mllama_config, ENV=ENV)
