"""Writes every rank-written checkpoint the conversion tests need, in one torchrun launch.

    torchrun --nproc_per_node 2 make_checkpoints.py ROOT TINY_MODEL_DIR DATA_JSON

1. ``ROOT/full``: the shardtune recipe (the code ``python -m shardtune.finetuning`` runs), FSDP2 on
   2 gloo ranks, 2 steps, a DCP checkpoint every 2 steps -> ``checkpoints/fine-tuned/step-000002``
   plus the HF model the recipe saves in ``ROOT/full``.
2. ``ROOT/lora``: the same with ``--use_peft`` (LoRA) and ``--merge_lora`` -> an adapter-only
   checkpoint, the adapter folder and ``ROOT/lora/merged``.
3. ``ROOT/llama-recipes``: what llama-recipes' ``save_model_and_optimizer_sharded`` writes: FSDP1
   (``FullyShardedDataParallel`` + activation-checkpoint wrappers) after one AdamW step,
   ``SHARDED_STATE_DICT``, ``{"model": model.state_dict(), "optim": FSDP.optim_state_dict(...)}``
   saved with ``dist_cp.save(..., storage_writer=FileSystemWriter(dir))`` and a flat
   ``train_params.yaml``; plus ``ROOT/llama-recipes-full/tiny-1.pt``, its FULL_STATE_DICT (the
   reference weights), saved like ``save_fsdp_model_checkpoint_full``.
"""

from __future__ import annotations

import functools
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import yaml

from shardtune.config import parse_args
from shardtune.finetuning import merge_saved_adapter, setup, train
from shardtune.parallel.distributed import init_distributed, shutdown


def recipe_args(model: str, data: str, out: Path, extra: list[str]) -> list[str]:
    return ["--enable_fsdp", "--device", "cpu", "--model_name", model, "--dataset", "alpaca_dataset",
            "--alpaca_dataset.data_path", data, "--batching_strategy", "padding", "--batch_size_training", "2",
            "--max_train_step", "2", "--save_every_n_steps", "2", "--output_dir", str(out),
            "--run_validation", "False", "--context_length", "64", "--lr", "5e-3", "--seed", "1", *extra]


def llama_recipes_fsdp1(model_dir: str, root: Path, rank: int) -> None:
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
        CheckpointImpl, apply_activation_checkpointing, checkpoint_wrapper)
    import torch.distributed.checkpoint as dist_cp
    from torch.distributed.fsdp import FullStateDictConfig, FullyShardedDataParallel as FSDP, StateDictType
    from torch.distributed.fsdp.wrap import transformer_auto_wrap_policy
    from transformers import LlamaForCausalLM
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    model = LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    torch.manual_seed(7)  # the same perturbation on every rank (FSDP1 on CPU cannot sync_module_states)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    policy = functools.partial(transformer_auto_wrap_policy, transformer_layer_cls={LlamaDecoderLayer})
    model = FSDP(model, auto_wrap_policy=policy, use_orig_params=False, device_id=torch.device("cpu"))
    apply_activation_checkpointing(
        model, checkpoint_wrapper_fn=functools.partial(checkpoint_wrapper, checkpoint_impl=CheckpointImpl.NO_REENTRANT),
        check_fn=lambda m: isinstance(m, LlamaDecoderLayer))
    optim = torch.optim.AdamW(model.parameters(), lr=1e-3)
    torch.manual_seed(100 + rank)
    ids = torch.randint(4, 200, (2, 12))
    model(input_ids=ids, labels=ids).loss.backward()
    optim.step()
    save_dir = root / "llama-recipes"
    with FSDP.state_dict_type(model, StateDictType.SHARDED_STATE_DICT):
        state_dict = {"model": model.state_dict(), "optim": FSDP.optim_state_dict(model, optim)}
        dist_cp.save(state_dict=state_dict, storage_writer=dist_cp.FileSystemWriter(save_dir))
    dist.barrier()
    full_cfg = FullStateDictConfig(offload_to_cpu=False, rank0_only=True)
    with FSDP.state_dict_type(model, StateDictType.FULL_STATE_DICT, full_cfg):
        full = model.state_dict()
    if rank == 0:
        # llama-recipes' save_train_params: train_config + fsdp_config, flat, values as strings
        params = {"model_name": model_dir, "enable_fsdp": "True", "lr": "0.001",
                  "dist_checkpoint_root_folder": str(root), "dist_checkpoint_folder": "llama-recipes",
                  "checkpoint_type": "StateDictType.SHARDED_STATE_DICT", "mixed_precision": "True"}
        (save_dir / "train_params.yaml").write_text(yaml.dump(params, indent=4))
        (root / "llama-recipes-full").mkdir(exist_ok=True)
        torch.save({k: v.detach().clone() for k, v in full.items()}, root / "llama-recipes-full" / "tiny-1.pt")
    dist.barrier()


def main() -> None:
    root, model, data = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
    env = init_distributed("cpu", need_group=True)
    try:
        for name, extra in (("full", []), ("lora", ["--use_peft", "--peft_method", "lora", "--merge_lora", "True"])):
            cfg = parse_args(recipe_args(model, data, root / name, extra)).config
            results = train(cfg, env, setup(cfg, env))
            merge_saved_adapter(cfg, env, results)  # --merge_lora, as the recipe's run() does
            dist.barrier()
        llama_recipes_fsdp1(model, root, env.rank)
        if env.is_main:
            (root / "DONE").write_text("ok\n")
    finally:
        shutdown()


if __name__ == "__main__":
    from shardtune.exits import run_with_clean_errors

    run_with_clean_errors(main)  # a rank ends without interpreter teardown (see end_process)
