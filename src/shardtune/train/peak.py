"""The peak FLOP/s per device that MFU divides by: ``--peak_tflops``, else the data-sheet figure of
a known GPU in the compute dtype, else a short GEMM measured at start-up (CPUs, unknown GPUs).
The one GPU table (:data:`GPU_PEAKS`, :func:`table_peak`) and the one GEMM probe (:func:`measure_gemm`
for the run, :func:`gemm_rate` for a fixed size) of the project; ``benchmarks/`` imports them.

Every figure in the table is *dense* (no 2:4 structured sparsity, which the data sheets often
quote as the headline number at twice the dense rate) and per GPU, in TFLOP/s, from the vendors'
data sheets. fp32 matmuls use TF32 tensor cores only when torch allows it
(``torch.backends.cuda.matmul.allow_tf32`` / ``torch.set_float32_matmul_precision``; off by
default), so the fp32 peak is plain fp32 unless TF32 is on.
"""

from __future__ import annotations

import math
import re
import time
from dataclasses import dataclass
from typing import Callable, Optional

import torch


@dataclass(frozen=True)
class GpuPeak:
    label: str
    needs: tuple[str, ...]  # upper-case words that all appear in torch.cuda.get_device_name()
    bf16: Optional[float]  # dense TFLOP/s; None: no such tensor-core path on this GPU
    fp16: float
    tf32: Optional[float]
    fp32: float


# Most specific first: the first entry whose words all appear in the device name wins.
GPU_PEAKS: tuple[GpuPeak, ...] = (
    GpuPeak("H100 NVL", ("H100", "NVL"), 835.5, 835.5, 417.5, 60.0),
    GpuPeak("H100 PCIe", ("H100", "PCIE"), 756.5, 756.5, 378.0, 51.2),
    GpuPeak("H100 SXM", ("H100",), 989.4, 989.4, 494.7, 66.9),  # "NVIDIA H100 80GB HBM3"
    GpuPeak("H800 PCIe", ("H800", "PCIE"), 756.5, 756.5, 378.0, 51.2),  # H100 silicon, export variant
    GpuPeak("H800 SXM", ("H800",), 989.4, 989.4, 494.7, 66.9),
    GpuPeak("GH200", ("GH200",), 989.4, 989.4, 494.7, 66.9),
    GpuPeak("H200 NVL", ("H200", "NVL"), 835.5, 835.5, 417.5, 60.0),
    GpuPeak("H200 SXM", ("H200",), 989.4, 989.4, 494.7, 66.9),
    GpuPeak("A100", ("A100",), 312.0, 312.0, 156.0, 19.5),  # SXM4 and PCIe, 40 and 80 GB alike
    GpuPeak("A800", ("A800",), 312.0, 312.0, 156.0, 19.5),  # A100 silicon, export variant
    GpuPeak("L40S", ("L40S",), 362.05, 362.05, 183.0, 91.6),
    GpuPeak("L40", ("L40",), 181.05, 181.05, 90.5, 90.5),
    GpuPeak("L4", ("L4",), 121.0, 121.0, 60.0, 30.3),
    GpuPeak("A40", ("A40",), 149.7, 149.7, 74.8, 37.4),
    GpuPeak("A10", ("A10",), 125.0, 125.0, 62.5, 31.2),  # not the A10G, whose figures differ
    GpuPeak("RTX 4090", ("RTX", "4090"), 165.2, 165.2, 82.6, 82.6),  # fp32 accumulation
    GpuPeak("V100 PCIe", ("V100", "PCIE"), None, 112.0, None, 14.0),
    GpuPeak("V100 SXM2", ("V100",), None, 125.0, None, 15.7),
    GpuPeak("T4", ("T4",), None, 65.0, None, 8.1),
    GpuPeak("MI300X", ("MI300X",), 1307.4, 1307.4, 653.7, 163.4),
)


@dataclass(frozen=True)
class Peak:
    flops: float  # FLOP/s per device
    source: str  # where the figure comes from, in words
    measured: bool = False

    def describe(self) -> str:
        return f"peak: {self.flops / 1e12:,.3g} TFLOP/s per device ({self.source}); MFU is measured against it"


def _words(device_name: str) -> set[str]:
    return set(re.split(r"[^A-Z0-9]+", device_name.upper())) - {""}


def lookup_gpu(device_name: str) -> Optional[GpuPeak]:
    """The table's entry for ``torch.cuda.get_device_name()``'s answer, or None."""
    words = _words(device_name)
    return next((g for g in GPU_PEAKS if all(w in words for w in g.needs)), None)


def tf32_enabled() -> bool:
    """Whether fp32 CUDA matmuls may run on TF32 tensor cores (the old and the new switches)."""
    matmul = torch.backends.cuda.matmul
    return (bool(matmul.allow_tf32) or torch.get_float32_matmul_precision() != "highest"
            or getattr(matmul, "fp32_precision", "") == "tf32")


def table_peak(device_name: str, dtype: torch.dtype, tf32: bool = False) -> Optional[Peak]:
    """The data-sheet peak of a known GPU in ``dtype``, or None (unknown GPU or dtype path)."""
    gpu = lookup_gpu(device_name)
    if gpu is None:
        return None
    if dtype == torch.bfloat16:
        kind, tflops = "bf16", gpu.bf16
    elif dtype == torch.float16:
        kind, tflops = "fp16", gpu.fp16
    elif dtype == torch.float32 and tf32 and gpu.tf32:
        kind, tflops = "tf32", gpu.tf32
    elif dtype == torch.float32:
        kind, tflops = "fp32", gpu.fp32
    else:
        return None
    if tflops is None:
        return None
    return Peak(tflops * 1e12, f"{device_name}: {gpu.label} data sheet, dense {kind}")


def _sync_of(device: torch.device) -> Callable[[], None]:
    return (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)


def measure_gemm(device: torch.device, dtype: torch.dtype, budget_s: float = 0.4,
                 max_n: Optional[int] = None, min_n: Optional[int] = None) -> tuple[float, str]:
    """Best FLOP/s of square matmuls in ``dtype`` on ``device`` within about ``budget_s`` seconds
    (2·n³ FLOPs each). The size doubles while one product is fast, so a slow path (bf16 on a CPU
    without bf16 units) stays within the budget; but it always reaches ``min_n`` (1024 on a CPU),
    since small products measure call overhead, not the peak (a 256² product on a busy machine
    gave a peak 30x too low, and an MFU of 3000%). Returns (FLOP/s, how it was measured)."""
    device = torch.device(device)
    cuda = device.type == "cuda"
    sync = _sync_of(device)
    max_n = max_n or (8192 if cuda else 2048)
    min_n = min(min_n or (4096 if cuda else 1024), max_n)
    deadline = time.perf_counter() + budget_s
    n, best, reps = 256, 0.0, 0
    # Its own generator: how many sizes are drawn depends on the machine's speed, and drawing them
    # from the global RNG would shift dropout's stream in the run that measures (the first in a
    # process), so two runs with one seed would train differently.
    generator = torch.Generator(device=device).manual_seed(0)
    while True:
        a = torch.randn(n, n, device=device, generator=generator).to(dtype)
        b = torch.randn(n, n, device=device, generator=generator).to(dtype)
        torch.mm(a, b)  # warm-up: kernel choice, first touch of the output
        sync()
        fastest = math.inf
        for _ in range(3):  # the fastest of a few: one descheduled product must not decide
            fastest, reps = min(fastest, _product_seconds(a, b, sync)), reps + 1
            if time.perf_counter() >= deadline:
                break
        best = max(best, _gemm_flops(n, fastest))
        if n >= max_n or n >= min_n and fastest * 8 * 4 > deadline - time.perf_counter():
            break  # the next size (8x the work, 4 products) would not fit in the budget
        n *= 2
    while time.perf_counter() + fastest < deadline:  # the largest size again, in the time left
        best, reps = max(best, _gemm_flops(n, _product_seconds(a, b, sync))), reps + 1
    threads = torch.get_num_threads()
    where = "GPU" if cuda else f"CPU, {threads} thread{'s' if threads != 1 else ''}"
    name = str(dtype).removeprefix("torch.")
    return best, f"measured: {name} {n}x{n} GEMM on the {where}, best of {reps}"


@dataclass(frozen=True)
class GemmRate:
    best: float  # FLOP/s of the fastest product
    median: float
    n: int
    reps: int


def gemm_rate(device: torch.device, dtype: torch.dtype, n: int, reps: int = 6,
              barrier: Optional[Callable[[], None]] = None) -> GemmRate:
    """FLOP/s of ``reps`` timed n×n×n products in ``dtype`` on ``device`` (after two untimed
    ones): a fixed-size probe, for measurements that compare runs at one size (benchmarks/).
    ``barrier`` is called just before timing, so that ranks probing at once share the machine
    alike. On a CPU it uses the current ``torch.get_num_threads()``."""
    device = torch.device(device)
    sync = _sync_of(device)
    generator = torch.Generator(device=device).manual_seed(0)  # the global RNG is left alone
    a = torch.randn(n, n, device=device, generator=generator).to(dtype)
    b = torch.randn(n, n, device=device, generator=generator).to(dtype)
    for _ in range(2):
        torch.mm(a, b)
    sync()
    if barrier is not None:
        barrier()
    rates = sorted(_gemm_flops(n, _product_seconds(a, b, sync)) for _ in range(reps))
    return GemmRate(best=rates[-1], median=rates[len(rates) // 2], n=n, reps=reps)


def _product_seconds(a: torch.Tensor, b: torch.Tensor, sync: Callable[[], None]) -> float:
    """Wall time of one ``a @ b``, finished (``sync``)."""
    t0 = time.perf_counter()
    torch.mm(a, b)
    sync()
    return time.perf_counter() - t0


def _gemm_flops(n: int, seconds: float) -> float:
    return 2 * n ** 3 / max(seconds, 1e-9)  # an n×n×n product is 2·n³ FLOPs


def resolve_peak(device: torch.device, dtype: torch.dtype, override_tflops: Optional[float] = None) -> Peak:
    """``--peak_tflops`` if given; a known GPU's data-sheet figure; else a GEMM measured now."""
    if override_tflops is not None:
        if not (math.isfinite(override_tflops) and override_tflops > 0):
            raise ValueError(f"peak_tflops must be finite and positive, got {override_tflops}")
        return Peak(override_tflops * 1e12, "--peak_tflops")
    device = torch.device(device)
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        found = table_peak(name, dtype, tf32=dtype == torch.float32 and tf32_enabled())
        if found is not None:
            return found
    key = (str(device), dtype, torch.get_num_threads())
    if key not in _MEASURED:  # once per process: a second run in it (tests, notebooks) reuses it
        flops, how = measure_gemm(device, dtype)
        if device.type == "cuda":
            how = (f"{torch.cuda.get_device_name(device)} is not in the table of known GPUs; {how}; pass "
                   "--peak_tflops with its data-sheet figure")
        _MEASURED[key] = Peak(flops, how, measured=True)
    return _MEASURED[key]


_MEASURED: dict[tuple, Peak] = {}
