"""Write what training produced as a Hugging Face directory that ``from_pretrained`` loads.

Full fine-tune: config, generation config, tokenizer and sharded safetensors in the training
dtype. PEFT: an adapter directory (``adapter_config.json`` + ``adapter_model.safetensors``) that
``PeftModel.from_pretrained`` loads. Files are written to a temporary folder first and moved in
only when complete, so an interrupted save never leaves a half-written model behind.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from ..parallel.distributed import DistEnv

MODEL_FILE_PATTERNS = ("*.safetensors", "model.safetensors.index.json", "adapter_config.json",
                       "config.json", "generation_config.json")


def is_peft_model(model: torch.nn.Module) -> bool:
    from peft import PeftModel

    return isinstance(model, PeftModel)


def save_tokenizer(tokenizer, path: str | Path) -> None:
    """Save the tokenizer so transformers 4.x and 5.x both load it.

    transformers 5 records ``"tokenizer_class": "TokenizersBackend"``, which 4.x refuses;
    ``PreTrainedTokenizerFast`` is the same fast tokenizer under a name both versions know.
    """
    tokenizer.save_pretrained(path)
    cfg_path = Path(path) / "tokenizer_config.json"
    if cfg_path.is_file():
        cfg = json.loads(cfg_path.read_text())
        if cfg.get("tokenizer_class") == "TokenizersBackend":
            cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
            cfg_path.write_text(json.dumps(cfg, indent=2))


def _full_state_dict(model: torch.nn.Module, trainable_only: bool) -> dict:
    """Full (unsharded) state dict on CPU, gathered on every rank from FSDP-sharded params."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True,
                               ignore_frozen_params=trainable_only)
    return get_model_state_dict(model, options=options)


def _is_sharded(model: torch.nn.Module) -> bool:
    return any(isinstance(p, DTensor) for p in model.parameters())


def _commit(tmp: Path, final: Path) -> None:
    """Move every file of ``tmp`` into ``final``; drop stale weight shards of an earlier save."""
    final.mkdir(parents=True, exist_ok=True)
    new = {p.name for p in tmp.iterdir()}
    for pattern in ("*.safetensors", "model.safetensors.index.json"):
        for old in final.glob(pattern):
            if old.name not in new:
                old.unlink()
    for item in tmp.iterdir():
        os.replace(item, final / item.name)
    shutil.rmtree(tmp, ignore_errors=True)


def save_hf_model(model: torch.nn.Module, tokenizer, output_dir: str | Path, *, env: DistEnv,
                  max_shard_size: str = "5GB") -> Optional[Path]:
    """Save a full model or a PEFT adapter into ``output_dir`` (from rank 0). Returns the path on rank 0."""
    output_dir = Path(output_dir)
    peft = is_peft_model(model)
    state_dict = None
    if _is_sharded(model):
        # Every rank takes part in the gather; only rank 0 writes. An adapter never needs the
        # frozen base, so only the trainable parameters are gathered.
        state_dict = _full_state_dict(model, trainable_only=peft)
        if peft:
            from peft import get_peft_model_state_dict

            state_dict = get_peft_model_state_dict(model, state_dict=state_dict)
    if env.is_main:
        tmp = output_dir / f".saving-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        if peft:
            model.save_pretrained(tmp, state_dict=state_dict)
        else:
            kwargs = {"state_dict": state_dict} if state_dict is not None else {}
            model.save_pretrained(tmp, max_shard_size=max_shard_size, safe_serialization=True, **kwargs)
        save_tokenizer(tokenizer, tmp)
        _commit(tmp, output_dir)
    if env.distributed:
        dist.barrier()
    return output_dir if env.is_main else None
