"""The planner's per-rank parameter, gradient and optimizer-state bytes equal the real sharded
tensors of a 2-rank gloo run, byte for byte, for every sharding strategy, LoRA, a tied head and
pure bf16 with AnyPrecisionAdamW (the session's shared 2-rank launch; the model's odd shapes make FSDP2 pad).
The LoRA cases hold their frozen embeddings and head whole on every rank (parallel/fsdp.py)."""

from __future__ import annotations

import pytest

from shardtune.config import parse_args
from shardtune.plan.estimate import dtypes_for, kept_whole, layout_for, shard_bytes
from shardtune.plan.shapes import build_shapes, model_config

STRATEGY = "--fsdp_config.sharding_strategy"


def _cases(model: str, tied: str) -> dict[str, list[str]]:
    def base(m: str) -> list[str]:
        return ["--model_name", m, "--enable_fsdp", "--device", "cpu", "--batch_size_training", "2",
                "--context_length", "32"]

    return {
        "full_shard": base(model) + [STRATEGY, "FULL_SHARD"],
        "shard_grad_op": base(model) + [STRATEGY, "SHARD_GRAD_OP"],
        "no_shard": base(model) + [STRATEGY, "NO_SHARD"],
        "hybrid_1x2": base(model) + [STRATEGY, "HYBRID_SHARD", "--fsdp_config.sharding_group_size", "2"],
        "hybrid_2x1": base(model) + [STRATEGY, "HYBRID_SHARD", "--fsdp_config.sharding_group_size", "1",
                                     "--fsdp_config.replica_group_size", "2"],
        "lora": base(model) + ["--use_peft", "--peft_method", "lora", "--lora_config.r", "3"],
        "lora_all_linear_tied": base(tied) + ["--use_peft", "--lora_config.r", "3", "--lora_config.target_modules",
                                              "all-linear", STRATEGY, "HYBRID_SHARD",
                                              "--fsdp_config.sharding_group_size", "2"],
        "bf16_anyprecision": base(model) + ["--fsdp_config.pure_bf16", "--fsdp_config.optimizer", "anyprecision"],
    }


@pytest.fixture(scope="module")
def measured(odd_model_dir, odd_tied_model_dir, tmp_path_factory, run_fsdp_cases):
    """shard_worker.py's measurement of every case, on the 2 ranks of the session's shared launch."""
    cases = _cases(str(odd_model_dir), str(odd_tied_model_dir))
    results = run_fsdp_cases(tmp_path_factory.mktemp("plan-shards"),
                             {name: {"kind": "shard_bytes", "args": args} for name, args in cases.items()})
    return cases, results


@pytest.mark.parametrize("case", list(_cases("m", "t")))
def test_per_rank_bytes_equal_the_real_shards(measured, case):
    cases, results = measured
    cfg = parse_args(cases[case]).config
    shapes = build_shapes(model_config(cfg.train.model_name), cfg)
    layout = layout_for(cfg, nnodes=1, nproc_per_node=2)
    dtypes = dtypes_for(cfg, "cpu")
    whole = lambda spec: kept_whole(spec, layout, dtypes, offload=False)  # noqa: E731 - LoRA's frozen root
    for rank, real in enumerate(results[case]):
        planned = shard_bytes(shapes, layout, cfg.fsdp.optimizer, "cpu", rank=rank, whole=whole)
        assert (planned.params, planned.grads, planned.optimizer) == (real["params"], real["grads"],
                                                                      real["optimizer"]), (case, rank, real)
        assert sum(s.trainable for s in shapes.params) == real["trainable"]


def test_the_cases_exercise_padding_and_unequal_shards(measured):
    """Guards the test itself: shards are padded (params > half of NO_SHARD's) and the two ranks'
    optimizer states differ, so an off-by-one in the padding rule would fail above."""
    _, results = measured
    full, whole = results["full_shard"], results["no_shard"]
    assert 2 * full[0]["params"] > whole[0]["params"]
    assert full[0]["optimizer"] != full[1]["optimizer"]


def test_lora_keeps_the_frozen_root_whole(measured, odd_model_dir):
    """A LoRA rank holds the whole frozen embedding and head (never all-gathered), a full
    fine-tune its shard of them: the LoRA case's parameters are the full-shard case's plus the
    unsharded rest of the root."""
    cases, results = measured
    cfg = parse_args(cases["lora"]).config
    shapes = build_shapes(model_config(cfg.train.model_name), cfg)
    root = [s for s in shapes.params if s.unit == 0]
    assert results["lora"][0]["whole_root"] == sorted(s.name for s in root) != []
    assert results["full_shard"][0]["whole_root"] == []
