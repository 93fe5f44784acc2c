"""Write what training produced as a Hugging Face directory that ``from_pretrained`` loads.

Full fine-tune: config, generation config, tokenizer and sharded safetensors in the training
dtype. PEFT: an adapter directory (``adapter_config.json`` + ``adapter_model.safetensors``) that
``PeftModel.from_pretrained`` loads. Files are written to a temporary folder first and moved in
only when complete, so an interrupted save never leaves a half-written model behind.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from ..parallel.distributed import DistEnv
from ..outputs import ownership
from ..outputs.atomic import temp_path
from ..model.names import saved_names
from .hf_stream import full_tensor, model_tensors, write_safetensors
from .model_config import write_model_config
from .progress import Progress
from .space import disk_full, is_out_of_space, tensor_bytes
from .safetensors_stream import TensorSpec
from .trainable import model_state

# Files of a saved model or adapter: an earlier save's ones that a new save did not rewrite are stale.
MODEL_FILE_PATTERNS = ("*.safetensors", "model.safetensors.index.json", "adapter_config.json",
                       "config.json", "generation_config.json")


def is_peft_model(model: torch.nn.Module) -> bool:
    # a PeftModel exists only once peft is imported; a full fine-tune never imports it (~2.3 s CPU)
    peft = sys.modules.get("peft")
    return peft is not None and isinstance(model, peft.PeftModel)


def save_tokenizer(tokenizer, path: str | Path) -> None:
    """Save the tokenizer, or a vision model's processor (image processor, tokenizer and chat
    template: what ``AutoProcessor.from_pretrained`` reads), so transformers 4.x and 5.x both load it.

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


def _trainable_full_state_dict(model: torch.nn.Module, env: DistEnv) -> dict:
    """The trainable parameters, unsharded on CPU on rank 0 (every rank takes part in each gather).
    Frozen weights are never gathered, tied aliases of frozen embeddings included (trainable.py)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    sharded = model_state(model, StateDictOptions(ignore_frozen_params=True))
    full = {}
    for name, value in sharded.items():  # the same order on every rank: one gather at a time
        value = full_tensor(value.detach())
        if env.is_main:
            full[name] = value.cpu()
    return full


def _is_sharded(model: torch.nn.Module) -> bool:
    return any(isinstance(p, DTensor) for p in model.parameters())


def _commit(tmp: Path, final: Path) -> None:
    """Move the saved files into ``final``; stale model files of an earlier shardtune save there
    (and only those) are removed (see ``ownership.commit_files``)."""
    ownership.commit_files(tmp, final, MODEL_FILE_PATTERNS)


def _abandon(tmp: Path, output_dir: Path, exc: BaseException, what: str, needed: int) -> None:
    """A save into ``output_dir`` failed: its temporary folder goes, and a full disk is said so."""
    shutil.rmtree(tmp, ignore_errors=True)
    if is_out_of_space(exc):
        raise disk_full(output_dir, what, needed, "What was saved there before (and any checkpoint) is "
                        "untouched.") from None


def write_config(model: torch.nn.Module, out: Path, dtype: torch.dtype, *,
                 base: Optional[str | Path] = None) -> None:
    """config.json (recording the dtype the weights are written in) and generation_config.json:
    the base model's own files, changed only where training changed them
    (:func:`model_config.write_model_config`). ``base``: the model folder, config.json or cached hub
    id the model was loaded from (default: the one ``from_pretrained`` recorded in its config)."""
    if base is None:
        base = getattr(model.config, "name_or_path", None)
    write_model_config(out, model.config, dtype, base=base,
                       generation_config=getattr(model, "generation_config", None))


def _as_saved(model: torch.nn.Module) -> list[tuple[str, torch.Tensor]]:
    """The model's tensors under the names ``save_pretrained`` writes (``model/names.saved_names``),
    the same names ``shardtune convert`` writes (Mllama: transformers 5 saves its pre-v5 layout)."""
    tensors = list(model_tensors(model))  # (name, parameter): references, nothing is gathered yet
    names = saved_names(model, sorted(name for name, _ in tensors))
    return [(names.get(name, name), tensor) for name, tensor in tensors]


def export_full_model(model: torch.nn.Module, tokenizer, output_dir: str | Path, *, env: DistEnv,
                      dtype: Optional[torch.dtype] = None, max_shard_size: str = "5GB") -> Optional[Path]:
    """Stream the model's tensors into an HF model directory, atomically (rank 0 writes)."""
    output_dir = Path(output_dir)
    tmp = temp_path(output_dir / "model")  # rank 0's folder; the other ranks only send tensors
    if env.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    first_dtype = next(model.parameters()).dtype
    tensors = _as_saved(model)
    # the files' headers come first: global shapes (a DTensor's .shape) and the written dtypes
    specs = [TensorSpec(name, tuple(t.shape), dtype or t.dtype if t.is_floating_point() else t.dtype)
             for name, t in tensors]
    needed = sum(sp.nbytes for sp in specs)
    progress = Progress("export", needed, len(specs)) if env.is_main else None
    try:
        write_safetensors(tensors, specs, tmp, is_main=env.is_main, max_shard_size=max_shard_size,
                          progress=progress)
        if env.is_main:
            write_config(model, tmp, dtype or first_dtype)
            save_tokenizer(tokenizer, tmp)
            _commit(tmp, output_dir)
    except Exception as exc:
        if env.is_main:
            _abandon(tmp, output_dir, exc, "the model's export", needed)
        raise
    finally:
        if progress is not None:
            progress.close()
    if env.distributed:
        dist.barrier()
    return output_dir if env.is_main else None


def save_hf_model(model: torch.nn.Module, tokenizer, output_dir: str | Path, *, env: DistEnv,
                  dtype: Optional[torch.dtype] = None, max_shard_size: str = "5GB") -> Optional[Path]:
    """Save a full model (streamed) or a PEFT adapter into ``output_dir``; returns it on rank 0.

    ``dtype`` converts a full model's weights (default: the training dtype). A merged LoRA model
    (``--merge_lora``) is not written here: the recipe folds the saved adapter into the base model's
    files with ``shardtune convert``'s streaming merge, the one merge there is.
    """
    output_dir = Path(output_dir)
    if not is_peft_model(model):
        return export_full_model(model, tokenizer, output_dir, env=env, dtype=dtype,
                                 max_shard_size=max_shard_size)
    state_dict = None
    if _is_sharded(model):
        # Every rank takes part in the gather; only rank 0 receives it and writes. An adapter never
        # needs the frozen base (nor a tied alias of it, lm_head.weight), so only the trainable
        # parameters are gathered. save_pretrained picks the adapter's tensors out of it (get_peft_model_state_dict): done here as well, a second
        # pass would look for modules_to_save copies under the names the first pass gave them.
        state_dict = _trainable_full_state_dict(model, env)
    if env.is_main:
        tmp = temp_path(output_dir / "adapter")
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            tmp.mkdir(parents=True)
            model.save_pretrained(tmp, state_dict=state_dict)
            save_tokenizer(tokenizer, tmp)
            _commit(tmp, output_dir)
        except Exception as exc:
            trainable = state_dict if state_dict is not None else {n: p for n, p in model.named_parameters()
                                                                   if p.requires_grad}
            _abandon(tmp, output_dir, exc, "the adapter", tensor_bytes(trainable))
            raise
    if env.distributed:
        dist.barrier()
    return output_dir if env.is_main else None
