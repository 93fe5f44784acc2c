"""Fixed model inputs for comparing two copies of a model (conversion ``--verify``, tests, the demo).

A vision model is probed with an image as well as text: without ``pixel_values`` Mllama skips its
cross-attention layers, so a text-only probe would not see the vision tower, the projector or the
cross-attention weights at all. The image is seeded noise of the size the vision config asks
for, in one tile that every text token attends to.
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
    vocab = min(getattr(text, "vocab_size", None) or 10**9, base.get_input_embeddings().weight.shape[0])
    ids = [(i * 7919 + 11) % vocab for i in range(tokens)]
    if not family_for_config(config).is_vision:
        return {"input_ids": torch.tensor([ids])}
    vision = config.vision_config
    if config.image_token_index < base.get_input_embeddings().weight.shape[0]:
        ids[0] = config.image_token_index  # (a config may name a token its embeddings lack)
    tiles, size = vision.max_num_tiles, vision.image_size
    g = torch.Generator().manual_seed(seed)
    pixel_values = torch.randn(1, 1, tiles, vision.num_channels, size, size, generator=g)
    aspect_ratio_mask = torch.zeros(1, 1, tiles, dtype=torch.long)
    aspect_ratio_mask[..., 0] = 1
    cross_attention_mask = torch.zeros(1, tokens, 1, tiles, dtype=torch.long)
    cross_attention_mask[..., 0] = 1  # every token sees the image's one tile
    return {"input_ids": torch.tensor([ids]), "pixel_values": pixel_values,
            "aspect_ratio_ids": torch.ones(1, 1, dtype=torch.long), "aspect_ratio_mask": aspect_ratio_mask,
            "cross_attention_mask": cross_attention_mask}


@torch.no_grad()
def probe_logits(model: nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """fp32 logits of ``model`` on ``inputs`` (moved to the model's device and float dtype)."""
    param = next(model.parameters())
    moved = {k: v.to(param.device, dtype=param.dtype if v.is_floating_point() else v.dtype)
             for k, v in inputs.items()}
    return model(**moved, use_cache=False).logits.float().cpu()
