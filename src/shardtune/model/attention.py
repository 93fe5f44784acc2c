"""Which attention kernel a run uses, why, and what a packed batch must carry for it.

``--use_fast_kernels`` asks for flash-attn 2. It is used only where it can run and give the
right answer: on a CUDA device, with flash-attn installed, and with fp16/bf16 compute (its
kernels take nothing else; an fp32 run would fail at the first step). Everywhere else the run
uses PyTorch SDPA, whose flash and memory-efficient backends are the fast path on CUDA, and the
start-up line says why.

Packed batches (several documents per row, ``position_ids`` restarting at 0 for each) must
attend within each document. Plain SDPA gets that from transformers, which builds a
block-diagonal causal mask from the ``position_ids`` when no ``attention_mask`` is passed, but
its masked kernel then computes every score of the row; a packed run with SDPA therefore uses
:data:`~shardtune.model.packed_attention.PACKED_SDPA`, SDPA called per group of documents of
similar length (``packed_attention.py``), which costs what the documents cost. flash-attn has
no mask: transformers' flash path reads document starts from ``position_ids`` only when the
batch has one row, so a packed batch of 4 rows would attend across documents. For flash and
packed SDPA the collator therefore also sends the cumulative document lengths over the
flattened batch (``cu_seq_lens_q/k``, ``max_length_q/k``), which transformers hands to the
attention function (flash-attn's varlen kernel, or the per-document SDPA) whatever the batch size.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from .packed_attention import PACKED_SDPA, register_packed_attention

SDPA = "sdpa"
FLASH_ATTENTION_2 = "flash_attention_2"
_FLASH_DTYPES = (torch.float16, torch.bfloat16)


@dataclass(frozen=True)
class AttentionChoice:
    implementation: str  # the attn_implementation transformers is given
    reason: str

    @property
    def packed_needs_varlen(self) -> bool:
        """Whether packed batches must carry cumulative sequence lengths (flash gets no mask; packed
        SDPA groups documents by them)."""
        return self.implementation.startswith("flash_attention") or self.implementation == PACKED_SDPA

    def describe(self) -> str:
        return f"attention: {self.implementation} ({self.reason})"


def flash_attn_installed() -> bool:
    from transformers.utils import is_flash_attn_2_available

    return bool(is_flash_attn_2_available())


def register_attention(implementation: str) -> None:
    """Make ``implementation`` known to transformers before a model is built with it."""
    if implementation == PACKED_SDPA:
        register_packed_attention()


def choose_attention(use_fast_kernels: bool, device: torch.device, compute_dtype: torch.dtype,
                     flash_installed: Optional[bool] = None, model_supports_flash: bool = True,
                     model_name: str = "", packing: bool = False) -> AttentionChoice:
    """The kernel for a run on ``device`` whose matmuls run in ``compute_dtype``.

    ``flash_installed`` defaults to asking transformers whether flash-attn 2 can be imported;
    ``model_supports_flash``: whether the model class has a flash-attn path (Mllama has none:
    it builds 4-D cross-attention masks); ``packing``: whether batches are packed (SDPA then
    attends per document instead of through a block-diagonal mask).
    """
    choice = _choose_kernel(use_fast_kernels, device, compute_dtype, flash_installed, model_supports_flash,
                            model_name)
    if packing and choice.implementation == SDPA:
        return AttentionChoice(PACKED_SDPA, f"{choice.reason}; packed batches attend one group of "
                                            "similar-length documents at a time, without a block mask")
    return choice


def _choose_kernel(use_fast_kernels: bool, device: torch.device, compute_dtype: torch.dtype,
                   flash_installed: Optional[bool], model_supports_flash: bool, model_name: str) -> AttentionChoice:
    if not use_fast_kernels:
        return AttentionChoice(SDPA, "PyTorch scaled_dot_product_attention, the default; "
                                     "--use_fast_kernels asks for flash-attn where it can run")
    if not model_supports_flash:
        return AttentionChoice(SDPA, f"--use_fast_kernels: {model_name or 'this model'} has no flash-attn "
                                     "path in transformers, so PyTorch SDPA (its flash and memory-efficient "
                                     "backends are the fast path on CUDA)")
    if device.type != "cuda":
        return AttentionChoice(SDPA, f"--use_fast_kernels: flash-attn needs a CUDA GPU, this run is on "
                                     f"{device.type}, so PyTorch SDPA")
    dtype = str(compute_dtype).removeprefix("torch.")
    if compute_dtype not in _FLASH_DTYPES:
        return AttentionChoice(SDPA, f"--use_fast_kernels: flash-attn computes only in fp16/bf16 and this run "
                                     f"computes in {dtype} (--mixed_precision False, or no bf16 on this GPU), "
                                     "so PyTorch SDPA")
    if flash_installed is None:
        flash_installed = flash_attn_installed()
    if not flash_installed:
        return AttentionChoice(SDPA, "--use_fast_kernels: flash-attn is not installed, so PyTorch SDPA, whose "
                                     "flash and memory-efficient backends are the fast path on CUDA")
    return AttentionChoice(FLASH_ATTENTION_2, f"--use_fast_kernels: flash-attn 2 with {dtype} compute; packed "
                                              "batches attend per document through its varlen kernel")
