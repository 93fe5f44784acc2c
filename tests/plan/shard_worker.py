"""Measures the real per-rank storage of a sharded training step, for the planner's exact test.

    torchrun --nproc_per_node 2 shard_worker.py CASES.json OUT.json

The test suite runs ``run_case`` in its shared launch instead (fsdp_worker.py's "shard_bytes" cases,
tests/plan/test_exact_shards.py); this form is for report_measured.py.

CASES.json maps a case name to recipe flags. For each case every rank builds the model the way the
recipe does (``setup_model``: loading, freezing, PEFT, activation checkpointing, ``shard_model``),
builds the recipe's optimizer, runs one forward + backward on a fixed random batch of
``--batch_size_training`` rows of ``--context_length`` tokens and one optimizer step, and sums the
bytes of the distinct storages behind its local parameter shards, its gradients and its optimizer
state. Rank 0 writes ``{case: [rank 0 result, rank 1 result]}`` to OUT.json.
"""

from __future__ import annotations

import faulthandler
import json
import sys

import torch
import torch.distributed as dist

from shardtune.config import parse_args
from shardtune.finetuning import setup_model
from shardtune.model.loading import load_inputs
from shardtune.parallel.distributed import init_distributed, shutdown
from shardtune.train.loop import loss_sum
from shardtune.train.optim import build_optimizer


def local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


def storage_bytes(tensors) -> int:
    """Bytes of the distinct storages behind ``tensors`` (views of one buffer count once)."""
    seen: dict[int, int] = {}
    for t in tensors:
        s = local(t).untyped_storage()
        if s.data_ptr():
            seen[s.data_ptr()] = s.nbytes()
    return sum(seen.values())


def run_case(args: list[str], env) -> dict:
    cfg = parse_args(args).config
    torch.manual_seed(cfg.train.seed)
    model = setup_model(cfg, env, load_inputs(cfg.train.model_name))
    optimizer = build_optimizer(model.parameters(), cfg.train, cfg.fsdp)
    g = torch.Generator().manual_seed(env.rank)
    vocab = model.get_input_embeddings().num_embeddings
    ids = torch.randint(0, vocab, (cfg.train.batch_size_training, cfg.train.context_length), generator=g)
    model.train()
    loss_sum(model, {"input_ids": ids, "labels": ids}).backward()
    grads = storage_bytes(p.grad for p in model.parameters() if p.grad is not None)
    optimizer.step()
    state = [v for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v)]
    return {"params": storage_bytes(model.parameters()), "grads": grads, "optimizer": storage_bytes(state),
            "trainable": sum(1 for p in model.parameters() if p.requires_grad),
            # parameters that are no DTensor: held whole on every rank
            "whole_root": sorted(n for n, p in model.named_parameters() if not hasattr(p, "to_local"))}


def main() -> None:
    cases = json.loads(open(sys.argv[1]).read())
    env = init_distributed("cpu", need_group=True)
    out = {}
    try:
        for name, args in cases.items():
            faulthandler.dump_traceback_later(120, exit=True)  # a hang fails fast and says where
            mine = run_case(args, env)
            everyone: list = [None] * env.world_size
            dist.all_gather_object(everyone, mine)
            out[name] = everyone
    finally:
        if env.is_main:
            with open(sys.argv[2], "w") as f:
                json.dump(out, f)
        shutdown()


if __name__ == "__main__":
    from shardtune.exits import run_with_clean_errors

    run_with_clean_errors(main)
