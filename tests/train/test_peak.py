"""MFU's denominator: the GPU table, the start-up GEMM, --peak_tflops."""

import math
import time

import pytest
import torch

from shardtune.config import ConfigError, parse_args
from shardtune.train.flops import mfu
from shardtune.train.peak import gemm_rate, lookup_gpu, measure_gemm, resolve_peak, table_peak


@pytest.mark.parametrize("name, label", [
    ("NVIDIA H100 80GB HBM3", "H100 SXM"), ("NVIDIA H100 PCIe", "H100 PCIe"), ("NVIDIA H100 NVL", "H100 NVL"),
    ("NVIDIA H200", "H200 SXM"), ("NVIDIA A100-SXM4-80GB", "A100"), ("NVIDIA A100 80GB PCIe", "A100"),
    ("NVIDIA L40S", "L40S"), ("NVIDIA L40", "L40"), ("NVIDIA L4", "L4"), ("NVIDIA A10", "A10"),
    ("Tesla V100-SXM2-32GB", "V100 SXM2"), ("AMD Instinct MI300X", "MI300X")])
def test_known_gpus_are_found_by_the_name_torch_reports(name, label):
    assert lookup_gpu(name).label == label


def test_unknown_or_look_alike_names_are_not_guessed():
    for name in ("NVIDIA A10G", "NVIDIA GeForce RTX 3090", "NVIDIA B200", "cpu"):
        assert lookup_gpu(name) is None


def test_the_table_peak_follows_the_compute_dtype():
    h100 = "NVIDIA H100 80GB HBM3"
    assert table_peak(h100, torch.bfloat16).flops == pytest.approx(989.4e12)  # dense, not the 2:4 figure
    assert table_peak(h100, torch.float16).flops == pytest.approx(989.4e12)
    assert table_peak(h100, torch.float32).flops == pytest.approx(66.9e12)
    assert table_peak(h100, torch.float32, tf32=True).flops == pytest.approx(494.7e12)
    assert "dense bf16" in table_peak(h100, torch.bfloat16).source
    assert table_peak("Tesla V100-SXM2-32GB", torch.bfloat16) is None  # no bf16 tensor cores: measured
    assert table_peak("Tesla V100-SXM2-32GB", torch.float16).flops == pytest.approx(125e12)


@pytest.mark.parametrize("name, label", [("NVIDIA H800 PCIe", "H800 PCIe"), ("NVIDIA H800", "H800 SXM"),
                                         ("NVIDIA A800-SXM4-80GB", "A800")])
def test_export_variants_have_their_silicon_s_figures(name, label):
    """The one table also knows the cards benchmarks/ had in its own (H800, A800)."""
    gpu = lookup_gpu(name)
    assert gpu.label == label
    twin = lookup_gpu(name.replace("H800", "H100").replace("A800", "A100"))
    assert (gpu.bf16, gpu.fp16, gpu.tf32, gpu.fp32) == (twin.bf16, twin.fp16, twin.tf32, twin.fp32)


def test_mfu_is_model_flop_rate_over_peak():
    assert mfu(6e12, 2.0, 1e13) == pytest.approx(0.3)
    assert mfu(1e12, 0.0, 1e12) == pytest.approx(1e9)  # a zero time is floored at 1 ns, not a ZeroDivisionError


def test_the_cpu_gemm_is_short_positive_and_finite():
    for dtype in (torch.float32, torch.bfloat16):  # bf16 is ~10x slower here: the budget holds anyway
        start = time.perf_counter()
        flops, how = measure_gemm(torch.device("cpu"), dtype, budget_s=0.15)
        assert time.perf_counter() - start < 1.0
        assert math.isfinite(flops) and flops > 0
        assert "GEMM on the CPU" in how


def test_resolve_peak_prefers_the_flag_then_measures_on_cpu():
    assert resolve_peak(torch.device("cpu"), torch.float32, 123.0).flops == 123e12
    assert resolve_peak(torch.device("cpu"), torch.float32, 123.0).source == "--peak_tflops"
    measured = resolve_peak(torch.device("cpu"), torch.float32)
    assert measured.measured and measured.flops > 0 and "measured" in measured.describe()
    assert resolve_peak(torch.device("cpu"), torch.float32) is measured  # once per process


def test_peak_tflops_must_be_finite_and_positive(tiny_model_dir):
    base = ["--model_name", str(tiny_model_dir)]
    assert parse_args([*base, "--peak_tflops", "989.4"]).config.train.peak_tflops == 989.4
    for bad in ("0", "-5", "nan", "inf"):
        with pytest.raises(ConfigError, match="peak_tflops"):
            parse_args([*base, "--peak_tflops", bad])


def test_the_run_reports_its_peak_at_start_up(logged_run):
    lines = [ln for ln in logged_run.printed.splitlines() if ln.startswith("peak: ")]
    assert len(lines) == 1 and "TFLOP/s per device" in lines[0] and "measured" in lines[0]
    assert logged_run.metrics["peak_tflops"] > 0 and "GEMM" in logged_run.metrics["peak_source"]


def test_measuring_the_peak_leaves_the_global_rng_alone():
    """The probe's size count depends on the machine's speed: drawing its matrices from the global
    RNG made the first LoRA run in a process (the one that measures) drop out differently."""
    torch.manual_seed(1)
    expected = torch.rand(4)
    torch.manual_seed(1)
    measure_gemm(torch.device("cpu"), torch.float32, budget_s=0.05, max_n=256, min_n=256)
    assert torch.equal(torch.rand(4), expected)


def test_the_fixed_size_probe_of_the_benchmarks_times_every_product_after_the_barrier():
    """``gemm_rate`` (benchmarks/ throughput and peers): the barrier comes before the timed
    products, best >= median > 0, and the global RNG is left alone."""
    calls = []
    torch.manual_seed(1)
    expected = torch.rand(4)
    torch.manual_seed(1)
    rate = gemm_rate(torch.device("cpu"), torch.float32, 128, reps=3, barrier=lambda: calls.append(1))
    assert torch.equal(torch.rand(4), expected)
    assert calls == [1] and rate.n == 128 and rate.reps == 3
    assert math.isfinite(rate.best) and rate.best >= rate.median > 0
