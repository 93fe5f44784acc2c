"""Fixed model inputs for comparing two copies of a model (conversion ``--verify``, tests, the demo).

A vision model is probed with an image as well as text: without ``pixel_values`` Mllama skips its
cross-attention layers, so a text-only probe would not see the vision tower, the projector or the
cross-attention weights at all. The family table's ``image_probe`` builds the image (for Mllama:
seeded noise of the size the vision config asks for, in one tile every text token attends to).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from .family import family_for_config

PROBE_TOKENS = 16


def probe_inputs(model: nn.Module, tokens: int = PROBE_TOKENS, seed: int = 0) -> dict[str, torch.Tensor]:
    """``input_ids`` (plus an image and its masks for a vision model) as keyword arguments."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = base.config
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    rows = base.get_input_embeddings().weight.shape[0]
    vocab = min(getattr(text, "vocab_size", None) or 10**9, rows)
    ids = [(i * 7919 + 11) % vocab for i in range(tokens)]
    probe = family_for_config(config).image_probe
    if probe is None:
        return {"input_ids": torch.tensor([ids])}
    image = probe(config, ids, seed, rows)  # may set ids[0] to the image token
    return {"input_ids": torch.tensor([ids]), **image}


@torch.no_grad()
def probe_logits(model: nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """fp32 logits of ``model`` on ``inputs`` (moved to the model's device and float dtype)."""
    param = next(model.parameters())
    moved = {k: v.to(param.device, dtype=param.dtype if v.is_floating_point() else v.dtype)
             for k, v in inputs.items()}
    return model(**moved, use_cache=False).logits.float().cpu()
