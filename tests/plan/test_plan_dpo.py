"""``shardtune plan`` with --use_dpo: two rows per pair, the reference's forward, and its copy (full only)."""

from __future__ import annotations

import pytest

from shardtune.config import parse_args
from shardtune.plan.advise import Planner, Run, suggest
from shardtune.plan.cli import hardware_for
from shardtune.plan.estimate import estimate, layout_for
from shardtune.plan.report import render_text, to_json
from shardtune.plan.shapes import build_shapes, size_config

DPO = ("--use_dpo", "--dataset", "preference_dataset", "--batching_strategy", "padding")
RUN = ("--enable_fsdp", "--batch_size_training", "2", "--context_length", "2048")


def _estimate(*flags: str):
    cfg = parse_args([*RUN, *flags]).config
    hw = hardware_for({"gpu": "H100"}, cfg, 8)
    return estimate(build_shapes(size_config("8b"), cfg), cfg, layout_for(cfg, 1, 8), hw), cfg, hw


@pytest.mark.parametrize("peft", [(), ("--use_peft",)])
def test_dpo_doubles_the_rows_and_adds_the_reference_forward(peft):
    sft, _, _ = _estimate("--batching_strategy", "padding", *peft)
    dpo, _, _ = _estimate(*DPO, *peft)
    twice, _, _ = _estimate("--batching_strategy", "padding", *peft, "--batch_size_training", "4")
    assert dpo.gpu.activations == twice.gpu.activations > sft.gpu.activations
    assert dpo.step.tokens_global == twice.step.tokens_global and dpo.step.model_flops == twice.step.model_flops
    forward = twice.step.model_flops / 3 if not peft else None  # full: forward + 2x backward
    extra = dpo.step.hardware_flops - twice.step.hardware_flops
    assert extra > 0
    if forward is not None:
        assert extra == pytest.approx(forward, rel=0.01)


def test_the_frozen_reference_copy_counts_for_full_runs_only():
    full, cfg, _ = _estimate(*DPO)
    assert full.gpu.reference == full.gpu.params > 0
    sft, _, _ = _estimate("--batching_strategy", "padding")
    assert full.gpu.persistent - sft.gpu.persistent == full.gpu.reference
    lora, _, _ = _estimate(*DPO, "--use_peft")
    assert lora.gpu.reference == 0
    assert "frozen reference model" in render_text(full, cfg, [])
    assert to_json(full, cfg, [])["per_gpu"]["reference_bytes"] == full.gpu.reference


def test_offloaded_reference_is_in_host_memory():
    est, _, _ = _estimate(*DPO, "--fsdp_config.fsdp_cpu_offload")
    sft, _, _ = _estimate("--batching_strategy", "padding", "--fsdp_config.fsdp_cpu_offload")
    assert est.gpu.reference == 0 and est.host.resident - sft.host.resident == 8 * est.shard.params


def test_planner_suggestions_run_on_a_dpo_config():
    cfg = parse_args([*RUN, *DPO]).config
    planner = Planner(size_config("8b"), hardware_for({"gpu": "H100"}, cfg, 8))
    run = Run(cfg, 1, 8)
    est = planner.estimate(run)
    assert isinstance(suggest(planner, run, est), list)


def test_precomputed_reference_has_no_copy_and_no_forward_per_step():
    live, _, _ = _estimate(*DPO)
    pre, _, _ = _estimate(*DPO, "--dpo_config.precompute_reference")
    twice, _, _ = _estimate("--batching_strategy", "padding", "--batch_size_training", "4")
    assert pre.gpu.reference == 0 < live.gpu.reference
    assert pre.step.hardware_flops == twice.step.hardware_flops < live.step.hardware_flops
