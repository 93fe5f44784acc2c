"""Gradient accumulation under FSDP: when gradients are reduced (--fsdp_config.gradient_sync).

The 2-rank loss equalities of both schedules are in test_fsdp.py; here: which schedule ``auto``
picks, the refusals, and that the recipe really keeps only sharded gradients between the
micro-batches of a step with ``every_micro_batch`` (and none with ``last_micro_batch``).
"""

from __future__ import annotations

import json

import pytest

from shardtune.config import ConfigError, ShardingStrategy, fsdp_config, parse_args, train_config
from shardtune.config.configs import GradientSync, defers_gradient_sync
from shardtune.finetuning import setup, train
from shardtune.parallel.distributed import init_distributed, shutdown


@pytest.mark.parametrize("strategy, use_peft, defers", [
    (ShardingStrategy.FULL_SHARD, False, False),  # unsharded fp32 gradients of the whole model: no
    (ShardingStrategy.SHARD_GRAD_OP, False, False),
    (ShardingStrategy.HYBRID_SHARD, False, False),
    (ShardingStrategy.NO_SHARD, False, True),  # gradients are whole on every rank anyway
    (ShardingStrategy.FULL_SHARD, True, True),  # adapters: a small trainable set
])
def test_auto_defers_only_where_unsharded_gradients_are_cheap(strategy, use_peft, defers):
    def rule(choice: GradientSync) -> bool:
        return defers_gradient_sync(train_config(use_peft=use_peft),
                                    fsdp_config(sharding_strategy=strategy, gradient_sync=choice))

    assert rule(GradientSync.auto) is defers
    assert rule(GradientSync.last_micro_batch) is True
    assert rule(GradientSync.every_micro_batch) is False


@pytest.mark.parametrize("flags, says", [
    (["--fsdp_config.gradient_sync", "every_micro_batch", "--gradient_accumulation_steps", "2"], "--enable_fsdp"),
    (["--enable_fsdp", "--fsdp_config.gradient_sync", "last_micro_batch"], "--gradient_accumulation_steps"),
])
def test_a_schedule_that_would_do_nothing_is_refused(flags, says):
    with pytest.raises(ConfigError, match=says):
        parse_args(flags)


def _grads_seen_by_each_micro_batch(tiny_model_dir, tmp_path, *extra: str) -> list[bool]:
    """Runs one optimizer step of 2 micro-batches through the recipe (FSDP, 1 rank) and records,
    as each micro-batch starts, whether any trainable parameter holds a (sharded) gradient."""
    data = tmp_path / "rows.json"
    data.write_text(json.dumps([{"instruction": f"Add {i} and 1.", "output": f"{i + 1}"} for i in range(16)]))
    cfg = parse_args(["--model_name", str(tiny_model_dir), "--dataset", "alpaca_dataset",
                      "--alpaca_dataset.data_path", str(data), "--output_dir", str(tmp_path / "out"),
                      "--enable_fsdp", "--device", "cpu", "--gradient_accumulation_steps", "2",
                      "--batch_size_training", "2", "--max_train_step", "1", "--num_epochs", "1",
                      "--save_model", "False", "--run_validation", "False", "--context_length", "64",
                      "--num_workers_dataloader", "0", *extra]).config
    env = init_distributed("cpu", need_group=True)
    seen = []
    try:
        c = setup(cfg, env)
        inner = c.loss_fn

        def recording(model, batch):
            seen.append(any(p.grad is not None for p in model.parameters() if p.requires_grad))
            return inner(model, batch)

        c.loss_fn = recording
        train(cfg, env, c)
    finally:
        shutdown()
    return seen


@pytest.mark.parametrize("extra, reduced_after_first", [
    ((), True),  # auto, full-parameter: reduce-scattered into sharded gradients after each backward
    (("--fsdp_config.gradient_sync", "last_micro_batch"), False),  # held unsharded inside FSDP until the last
    (("--use_peft",), False),  # auto, adapters: once per step
])
def test_the_recipe_reduces_when_the_schedule_says(tiny_model_dir, tmp_path, extra, reduced_after_first):
    seen = _grads_seen_by_each_micro_batch(tiny_model_dir, tmp_path, *extra)
    assert seen == [False, reduced_after_first]
