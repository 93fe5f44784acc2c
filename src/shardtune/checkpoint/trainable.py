"""The model state a checkpoint or adapter holds: with frozen weights (PEFT), the trainable tensors only.

DCP's ``StateDictOptions(ignore_frozen_params=True)`` drops frozen parameters by walking
``named_parameters()``, which lists a tied parameter once: ``lm_head.weight``, the alias of a
frozen ``embed_tokens.weight`` (``tie_word_embeddings``, Llama 3.2 1B/3B), stays in the state
dict — 1.05 GB in every LoRA step checkpoint of a Llama-3.2-1B shape. Here every name of a
frozen parameter, aliases included (``remove_duplicate=False``), is left out, on save and on load
alike, so a checkpoint written this way and the state dict that reads it name the same tensors.
"""

from __future__ import annotations

import torch
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict


def has_frozen(model: torch.nn.Module) -> bool:
    return any(not p.requires_grad for p in model.parameters())


def frozen_names(model: torch.nn.Module) -> set[str]:
    """Every name under which a frozen parameter is reached, tied aliases included."""
    return {name for name, p in model.named_parameters(remove_duplicate=False) if not p.requires_grad}


def model_state(model: torch.nn.Module, options: StateDictOptions) -> dict:
    """``get_model_state_dict(model, options)``, and with ``ignore_frozen_params`` no frozen tensor
    under any of its names. Sharded (DTensor) values stay sharded unless ``options`` gathers them."""
    if not options.ignore_frozen_params:
        return get_model_state_dict(model, options=options)
    if options.full_state_dict:
        raise ValueError("model_state gathers nothing: gather the filtered sharded state (full_state_dict=False)")
    state = get_model_state_dict(model, options=options)
    frozen = frozen_names(model)
    return {name: value for name, value in state.items() if name not in frozen}
