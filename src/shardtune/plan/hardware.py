"""GPUs the planner knows by name: memory and dense peak FLOP/s from the vendors' data sheets.

Memory is in GiB as the device reports it (an "80 GB" A100 or H100 shows 79-80 GiB; the table
says 80, pass ``--gpu_memory`` for the exact figure). Peaks are dense (no 2:4 sparsity) and per
GPU: bf16/fp16 tensor cores, and plain fp32 (torch leaves TF32 matmuls off by default). The
planner's time is only as good as the assumed MFU, which it prints.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from ..config import ConfigError
from ..train.peak import GPU_PEAKS


_PEAKS = {p.label: p for p in GPU_PEAKS}


@dataclass(frozen=True)
class Gpu:
    """A GPU the planner knows by name: its memory, and its peaks from the one data-sheet table
    the training loop's MFU uses too (``train/peak.GPU_PEAKS``)."""

    name: str
    memory_gib: float
    peak_label: str  # the row of train/peak.GPU_PEAKS

    @property
    def bf16(self) -> bool:
        """Has bf16 (V100 and T4 do not: the recipe computes in fp32 or --use_fp16)."""
        return _PEAKS[self.peak_label].bf16 is not None

    @property
    def bf16_tflops(self) -> float:
        """Dense bf16 tensor-core peak (fp16 where bf16 is missing)."""
        peak = _PEAKS[self.peak_label]
        return peak.bf16 if peak.bf16 is not None else peak.fp16

    @property
    def fp32_tflops(self) -> float:
        return _PEAKS[self.peak_label].fp32


GPUS: dict[str, Gpu] = {g.name: g for g in (
    Gpu("h100", 80, "H100 SXM"),  # H100 SXM5 80 GB
    Gpu("h100-pcie", 80, "H100 PCIe"),
    Gpu("h200", 141, "H200 SXM"),
    Gpu("a100", 80, "A100"),  # A100 SXM4 80 GB
    Gpu("a100-40gb", 40, "A100"),
    Gpu("l40s", 48, "L40S"),
    Gpu("l4", 24, "L4"),
    Gpu("v100", 32, "V100 SXM2"),  # fp16 tensor cores
    Gpu("mi300x", 192, "MI300X"),
)}
DEFAULT_GPU = "h100"


def gpu_named(name: Optional[str]) -> Gpu:
    key = (name or DEFAULT_GPU).strip().lower()
    if key not in GPUS:
        raise ConfigError(f"--gpu must be one of {', '.join(GPUS)}; got {name!r}. For another GPU pass "
                          "--gpu_memory (GiB) and --peak_tflops (dense bf16 TFLOP/s per GPU).")
    return GPUS[key]


_UNITS = {"": 1024 ** 3, "gib": 1024 ** 3, "gb": 10 ** 9, "tib": 1024 ** 4, "tb": 10 ** 12, "mib": 1024 ** 2,
          "mb": 10 ** 6}


def parse_size(text: str, flag: str) -> int:
    """``80`` (GiB), ``80GiB``, ``80GB`` (10^9 bytes), ``2TiB`` -> bytes."""
    raw = str(text).strip().lower().replace(" ", "")
    number = raw.rstrip("abcdefghijklmnopqrstuvwxyz")
    unit = raw[len(number):]
    try:
        value = float(number)
    except ValueError:
        value = -1.0
    if unit not in _UNITS or not value > 0:
        raise ConfigError(f"{flag} expects a positive size such as 80 (GiB), 80GiB, 512GB or 2TiB; got {text!r}.")
    return int(value * _UNITS[unit])
