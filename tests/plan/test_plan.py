"""Planner unit tests: known parameter counts, FSDP2's padding rule, precision and strategy
semantics, suggestions, the CLI's text and JSON output, and its errors."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from shardtune.config import ConfigError, parse_args
from shardtune.plan.advise import Planner, Run, suggest
from shardtune.plan.cli import hardware_for, split_planner_args
from shardtune.plan.estimate import GiB, layout_for, local_numel, padded_numel
from shardtune.plan.hardware import parse_size
from shardtune.plan.shapes import ParamSpec, build_shapes, quant_state_4bit, size_config


def cfg_of(*flags: str):
    return parse_args(list(flags)).config


def plan(size: str, *flags: str, nnodes: int = 1, nproc: int = 8, **opts):
    cfg = cfg_of(*flags)
    planner = Planner(size_config(size), hardware_for(opts, cfg, nproc))
    run = Run(cfg, nnodes, nproc)
    est = planner.estimate(run)
    return est, suggest(planner, run, est)


@pytest.mark.parametrize("size, count", [("1b", 1_235_814_400), ("3b", 3_212_749_824), ("8b", 8_030_261_248),
                                         ("70b", 70_553_706_496), ("405b", 405_853_388_800)])
def test_llama3_parameter_counts(size, count):
    assert build_shapes(size_config(size), cfg_of()).total_params == count


def test_lora_parameter_count_of_8b():
    """r=8 on q_proj and v_proj of 32 layers: (8x4096 + 4096x8) + (8x4096 + 1024x8) per layer."""
    shapes = build_shapes(size_config("8b"), cfg_of("--use_peft"))
    assert shapes.trainable_params == 32 * (2 * 8 * 4096 + 8 * 4096 + 1024 * 8) == 3_407_872
    assert {s.itemsize for s in shapes.params if s.trainable} == {4}  # peft keeps adapters in fp32


def test_lora_count_equals_peft_on_a_real_model(tiny_model_dir):
    """The planner's adapter shapes (built on the meta device) against peft's own adapter on the
    real tiny model, with a rank above the model's width and DoRA's magnitude vectors."""
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    from shardtune.model.peft import peft_config_for
    from shardtune.plan.shapes import model_config

    for flags in (["--lora_config.r", "100"], ["--lora_config.r", "3", "--lora_config.use_dora", "true",
                                              "--lora_config.target_modules", "q_proj,k_proj,v_proj,o_proj"]):
        cfg = cfg_of("--use_peft", *flags)
        planned = build_shapes(model_config(str(tiny_model_dir)), cfg).trainable_params
        base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
        real = get_peft_model(base, peft_config_for(cfg, base))
        assert planned == sum(p.numel() for p in real.parameters() if p.requires_grad) > 0, flags


def test_plan_allocates_no_adapter_whatever_the_lora_rank():
    """r=1,000,000 on the 1b shape: q_proj's lora_A alone would be 8.2 GB. The plan runs under a
    6 GiB address-space limit, so one real adapter tensor fails it (it did: peft builds adapters
    on the CPU before moving them to the base layer's meta device)."""
    import resource

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (6 * 2**30, 6 * 2**30))

    out = subprocess.run([sys.executable, "-m", "shardtune", "plan", "--size", "1b", "--use_peft",
                          "--lora_config.r", "1000000", "--json"], capture_output=True, text=True,
                         timeout=600, preexec_fn=limit)
    assert out.returncode == 0, out.stderr[-3000:]
    trainable = 16 * 1_000_000 * (2048 + 2048 + 2048 + 512)  # q_proj and v_proj of 16 layers
    assert json.loads(out.stdout)["model"]["trainable_parameters"] == trainable


def test_fsdp2_padding_rule():
    spec = ParamSpec("w", (101, 3), 4, True, 1)
    assert padded_numel(spec, 2) == 51 * 3
    assert [local_numel(spec, 2, r) for r in range(2)] == [51 * 3, 50 * 3]
    assert [local_numel(spec, 4, r) for r in range(4)] == [26 * 3, 26 * 3, 26 * 3, 23 * 3]
    small = ParamSpec("b", (3,), 4, True, 1)  # fewer rows than ranks: one row each, the last rank none
    assert padded_numel(small, 4) == 1 and [local_numel(small, 4, r) for r in range(4)] == [1, 1, 1, 0]


def test_strategies_shard_as_the_mesh_says():
    """8B in fp32 with AdamW: every dimension divides 8 and 16, so FULL_SHARD holds exactly 1/16."""
    n = 8_030_261_248
    full, _ = plan("8b", "--enable_fsdp", nnodes=2)
    assert (full.gpu.params, full.gpu.grads, full.gpu.optimizer) == (4 * n // 16, 4 * n // 16, 8 * n // 16)
    hybrid, _ = plan("8b", "--enable_fsdp", "--fsdp_config.sharding_strategy", "HYBRID_SHARD", nnodes=2)
    assert (hybrid.layout.replicas, hybrid.layout.shard) == (2, 8) and hybrid.gpu.params == 4 * n // 8
    replicated, _ = plan("8b", "--enable_fsdp", "--fsdp_config.sharding_strategy", "NO_SHARD")
    assert replicated.gpu.params == 4 * n
    grad_op, _ = plan("8b", "--enable_fsdp", "--fsdp_config.sharding_strategy", "SHARD_GRAD_OP")
    full8, _ = plan("8b", "--enable_fsdp")
    assert grad_op.gpu.params == full8.gpu.params
    # SHARD_GRAD_OP keeps every block gathered between forward and backward: all of them in bf16
    assert grad_op.gpu.temporaries.all_gather - full8.gpu.temporaries.all_gather > 2 * n * 0.8


def test_precision_and_optimizer_bytes_per_parameter():
    n = 8_030_261_248
    mixed, _ = plan("8b", "--enable_fsdp")
    assert str(mixed.dtypes.compute) == "torch.bfloat16" and mixed.gpu.params == 4 * n // 8
    pure, _ = plan("8b", "--enable_fsdp", "--fsdp_config.pure_bf16", "--fsdp_config.optimizer", "anyprecision")
    assert (pure.gpu.params, pure.gpu.grads, pure.gpu.optimizer) == (2 * n // 8, 2 * n // 8, 6 * n // 8)
    fp32, _ = plan("8b", "--enable_fsdp", "--mixed_precision", "false")
    assert str(fp32.dtypes.compute) == "torch.float32"
    v100, _ = plan("8b", "--enable_fsdp", gpu="v100")  # no bf16: the recipe computes in fp32
    assert str(v100.dtypes.compute) == "torch.float32"


def test_gradient_accumulation_holds_unsharded_fp32_gradients_only_when_reduced_once_per_step():
    one, _ = plan("8b", "--enable_fsdp")
    four, _ = plan("8b", "--enable_fsdp", "--gradient_accumulation_steps", "4")  # auto: every micro-batch
    assert one.gpu.temporaries.accumulation == four.gpu.temporaries.accumulation == 0
    assert not any("unsharded fp32 gradient" in n for n in four.notes)
    deferred, advice = plan("8b", "--enable_fsdp", "--gradient_accumulation_steps", "4",
                            "--fsdp_config.gradient_sync", "last_micro_batch", gpu="a100-40gb")
    assert deferred.gpu.temporaries.accumulation == 4 * 8_030_261_248
    assert any("unsharded fp32 gradient" in n for n in deferred.notes)
    assert "--fsdp_config.gradient_sync every_micro_batch" in [s.flags for s in advice]
    lora, _ = plan("8b", "--enable_fsdp", "--gradient_accumulation_steps", "4", "--use_peft")  # auto: once
    assert lora.gpu.temporaries.accumulation == 4 * lora.shapes.trainable_params


def test_cpu_offload_moves_the_shards_to_the_host():
    est, _ = plan("70b", "--enable_fsdp", "--fsdp_config.fsdp_cpu_offload", nnodes=2)
    assert est.gpu.params == est.gpu.grads == est.gpu.optimizer == 0
    assert est.host.resident >= 8 * (est.shard.params + est.shard.optimizer)


def test_low_cpu_fsdp_host_ram():
    normal, _ = plan("70b", "--enable_fsdp", nnodes=2)
    low, _ = plan("70b", "--enable_fsdp", "--low_cpu_fsdp", nnodes=2)
    assert normal.host.load_normal == 8 * 4 * 70_553_706_496  # every rank builds the fp32 model
    assert low.host.peak < normal.host.peak / 50


def test_qlora_base_is_packed_4bit():
    shapes = build_shapes(size_config("8b"), cfg_of("--use_peft", "--quantization", "4bit"))
    packed = [s for s in shapes.params if s.logical_numel]
    assert shapes.total_params - shapes.trainable_params == 8_030_261_248 and shapes.quantized == "4bit"
    assert sum(s.nbytes for s in packed) * 2 == sum(s.logical_numel for s in packed)  # half a byte each
    assert all(not s.trainable and s.shape[1] == 1 for s in packed)
    assert not any("lm_head" in s.name for s in packed)  # transformers keeps the head unquantized


def test_quant_state_matches_bitsandbytes():
    bnb = pytest.importorskip("bitsandbytes")
    import torch

    for double in (False, True):
        weight = bnb.nn.Params4bit(torch.randn(101, 63), requires_grad=False, quant_type="nf4",
                                   quant_storage=torch.bfloat16, compress_statistics=double)._quantize("cpu")
        state = weight.quant_state.as_dict(packed=False)
        real = sum(v.numel() * v.element_size() for v in state.values() if torch.is_tensor(v))
        assert real == quant_state_4bit(101 * 63, double)
        assert tuple(weight.shape) == ((101 * 63 + 1) // 4, 1)


def test_70b_on_two_nodes_of_eight_h100():
    """The issue's example: HYBRID_SHARD replicates the model per node and does not fit; the planner
    names FULL_SHARD and PEFT for the GPUs and --low_cpu_fsdp for the host."""
    est, found = plan("70b", "--enable_fsdp", "--fsdp_config.sharding_strategy", "HYBRID_SHARD",
                      "--batch_size_training", "1", nnodes=2, host_memory="1TiB")
    assert not est.gpu.fits and est.host.fits is False
    flags = {s.fixes: [] for s in found}
    for s in found:
        flags[s.fixes].append(s.flags)
        assert (s.estimate.gpu.fits if s.fixes == "GPU memory" else s.estimate.host.fits) is True
    assert "--low_cpu_fsdp" in flags["host RAM"]
    assert "--use_peft --peft_method lora" in flags["GPU memory"]
    full, _ = plan("70b", "--enable_fsdp", "--fsdp_config.sharding_strategy", "FULL_SHARD", "--batch_size_training",
                   "1", "--use_peft", "--low_cpu_fsdp", nnodes=2, host_memory="1TiB")
    assert full.fits


def test_a_run_that_does_not_fit_gets_a_combination_when_no_single_flag_does():
    est, found = plan("70b", "--enable_fsdp", "--fsdp_config.sharding_strategy", "NO_SHARD",
                      "--fsdp_config.fsdp_activation_checkpointing", "false", nproc=8)
    assert not est.fits and len(found) == 1 and found[0].estimate.gpu.fits
    assert "--fsdp_config.sharding_strategy FULL_SHARD" in found[0].flags


def test_step_time_is_flops_over_peak_times_mfu():
    est, _ = plan("8b", "--enable_fsdp", "--batch_size_training", "1", "--context_length", "4096", mfu="0.5")
    st = est.step
    n_mm = 32 * (4096 * 4096 * 2 + 2 * 4096 * 1024 + 3 * 4096 * 14336) + 4096 * 128256  # projections + head
    model = 6 * n_mm * 4096 + 12 * 32 * 4096 * 4096 ** 2
    assert st.model_flops == pytest.approx(model, rel=1e-9)
    assert st.hardware_flops == pytest.approx(model + 2 * n_mm * 4096 + 4 * 32 * 4096 * 4096 ** 2, rel=1e-9)
    assert st.seconds == pytest.approx(st.hardware_flops / (989.4e12 * 0.5))  # H100 SXM dense bf16 (train/peak.py)
    lora, _ = plan("8b", "--enable_fsdp", "--batch_size_training", "1", "--context_length", "4096", "--use_peft")
    assert lora.step.model_flops == pytest.approx(model - 2 * (n_mm - 3_407_872) * 4096, rel=1e-9)


def test_sizes_and_options_parse():
    assert parse_size("80", "--gpu_memory") == 80 * GiB and parse_size("80GB", "x") == 80 * 10 ** 9
    assert parse_size("2TiB", "x") == 2 * 1024 ** 4
    for bad in ("-1", "eighty", "80XB", "0"):
        with pytest.raises(ConfigError):
            parse_size(bad, "--gpu_memory")
    opts, rest = split_planner_args(["--size", "8b", "--lr", "1e-5", "--json", "--mfu=0.3"])
    assert opts == {"size": "8b", "json": True, "mfu": "0.3"} and rest == ["--lr", "1e-5"]


def test_world_without_fsdp_is_refused_like_the_recipe():
    with pytest.raises(ConfigError, match="--enable_fsdp"):
        layout_for(cfg_of(), 1, 8)


@pytest.fixture
def shardtune(shardtune_cli):
    """``shardtune(*args)``: the command as a user runs it, in a process of its own (stdout must be
    the JSON alone)."""
    return lambda *args: shardtune_cli(["plan", *args], timeout=300)


def run_cli(capsys, *args: str) -> tuple[int, str, str]:
    """``shardtune plan ...`` in this process (the same entry point, without a second start-up)."""
    from shardtune.cli import main

    try:
        main(["plan", *args])
        code = 0
    except SystemExit as exc:
        code = exc.code
    out = capsys.readouterr()
    return code, out.out, out.err


def test_cli_json(shardtune):
    out = shardtune("--size", "8b", "--enable_fsdp", "--nproc_per_node", "8", "--batch_size_training", "1",
                    "--json")
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    gpu = data["per_gpu"]
    for key in ("params_bytes", "grads_bytes", "optimizer_bytes", "activations_bytes", "total_bytes"):
        assert isinstance(gpu[key], int) and gpu[key] > 0
    assert gpu["params_bytes"] == 4 * 8_030_261_248 // 8 and isinstance(gpu["fits"], bool) and gpu["fits"]
    assert gpu["total_bytes"] > gpu["params_bytes"] + gpu["grads_bytes"] + gpu["optimizer_bytes"]
    assert data["step_time"]["estimate"] is True and data["step_time"]["seconds"] > 0


def test_cli_text_names_the_flags_to_change(capsys):
    code, out, _ = run_cli(capsys, "--size", "8b", "--enable_fsdp", "--nproc_per_node", "8", "--nnodes", "2",
                           "--rdzv_backend", "c10d", "--fsdp_config.sharding_strategy", "NO_SHARD",
                           "--fsdp_config.fsdp_activation_checkpointing", "false")
    assert code == 0
    assert "DOES NOT FIT" in out and "--fsdp_config.sharding_strategy FULL_SHARD" in out
    assert "an estimate" in out and "assumed" in out and "per host (8 ranks)" in out


@pytest.mark.parametrize("args, message", [
    (["--size", "13b"], "--size must be one of 1b, 3b, 8b, 70b, 405b"),
    ([], "needs a model"),
    (["--size", "8b", "--model_name", "x/y"], "not both"),
    (["--size", "8b", "--lrr", "1"], "Did you mean --lr?"),
    (["--size", "8b", "--nproc_per_node", "8"], "--enable_fsdp"),
    (["--size", "8b", "--gpu", "h900"], "--gpu must be one of"),
    (["--size", "8b", "--mfu", "2"], "--mfu must be a number"),
    (["--model_name", "/no/such/dir"], "does not exist"),
])
def test_cli_errors_are_one_paragraph(capsys, args, message):
    code, _, err = run_cli(capsys, *args)
    assert code == 2 and message in err, err
    assert err.startswith("error: ") and err.count("\n") == 1


def test_cli_error_from_a_subprocess_has_no_traceback(shardtune):
    out = shardtune("--size", "13b")
    assert out.returncode == 2 and "--size must be one of" in out.stderr and "Traceback" not in out.stderr
