"""Model FLOPs: the one formula the recipe's live MFU, ``benchmarks/`` and the tests use; and
``--flop_counter``, the exact count of one step by torch's FlopCounterMode.

The formula (PaLM's convention, Chowdhery et al. 2022, appendix B), per optimizer step::

    2·N·T (forward) + 2·N·T (input gradients) + 2·N_w·T (weight gradients)
      + 12·L·h_q·Σ len²  (QKᵀ and AV: forward 4·L·h_q·len² per document, backward twice that)

``N`` = weights that multiply every token (the decoder's projections and the LM head; not the
input embedding, a lookup, nor the norms); ``N_w`` = those among them (or the adapter's) that get
a weight gradient, ``N`` in a full fine-tune, which makes the matmul term the familiar ``6·N·T``
(training = 3 × forward); ``T`` = non-pad tokens; ``L`` layers; ``h_q`` = query heads × head dim;
the sum runs over the step's documents (each padded row; each packed document, since packed
attention is block-diagonal). The causal mask is not discounted, and pads, activation
checkpointing's recomputed forward and the optimizer are not credited: the figure measures useful
work, as MFU should. For a vision model (Mllama) only the text decoder is counted, every layer as
self-attention; the vision tower's FLOPs are not.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch.utils.flop_counter import FlopCounterMode, flop_registry, sdpa_backward_flop_count, sdpa_flop_count

from ..batches import IGNORE_INDEX
from .types import StepResult


@dataclass(frozen=True)
class ModelShape:
    """The sizes the formula needs, read from a model's (text) config."""

    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int

    @classmethod
    def from_config(cls, config) -> "ModelShape":
        text = config.get_text_config() if hasattr(config, "get_text_config") else config
        heads = text.num_attention_heads
        head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
        return cls(layers=text.num_hidden_layers, hidden=text.hidden_size, heads=heads,
                   kv_heads=getattr(text, "num_key_value_heads", None) or heads, head_dim=head_dim,
                   intermediate=text.intermediate_size, vocab=text.vocab_size)

    @property
    def attention_width(self) -> int:
        """h_q: the width of QKᵀ and AV (query heads × head dim)."""
        return self.heads * self.head_dim

    @property
    def matmul_params(self) -> int:
        """N: q, k, v, o and the gated MLP's three projections per layer, plus the LM head."""
        d, q, kv = self.hidden, self.attention_width, self.kv_heads * self.head_dim
        per_layer = d * q + 2 * d * kv + q * d + 3 * d * self.intermediate
        return self.layers * per_layer + d * self.vocab


def model_flops(shape: ModelShape, tokens: float, doc_len_sq: float,
                weight_grad_params: Optional[int] = None) -> float:
    """Model FLOPs of a training step over ``tokens`` non-pad tokens whose documents' squared
    lengths sum to ``doc_len_sq`` (see the module docstring). ``weight_grad_params``: N_w
    (default N, a full fine-tune)."""
    n = shape.matmul_params
    n_w = n if weight_grad_params is None else min(weight_grad_params, n)
    return (4 * n + 2 * n_w) * tokens + 12 * shape.layers * shape.attention_width * doc_len_sq


def mfu(flops: float, seconds: float, peak_flops: float) -> float:
    """Model FLOPs utilisation: ``flops`` (model FLOPs of one device, :func:`model_flops` divided
    by the devices that shared the work) done in ``seconds``, over the device's ``peak_flops``
    (FLOP/s, ``peak.py``). The recipe's live figure and ``benchmarks/`` both divide here."""
    return flops / max(seconds, 1e-9) / peak_flops


def forward_flops(shape: ModelShape, tokens: float, doc_len_sq: float) -> float:
    """Model FLOPs of a forward pass alone (evaluation)."""
    return 2 * shape.matmul_params * tokens + 4 * shape.layers * shape.attention_width * doc_len_sq


def weight_grad_params(model: torch.nn.Module, shape: ModelShape) -> int:
    """N_w of ``model``: its trainable matrices, without the input embedding (a lookup whose
    gradient is a scatter, not a matmul) unless the LM head shares it; at most N. Global sizes
    under FSDP (a DTensor's numel is the full tensor's)."""
    embed = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    skip = embed.weight if embed is not None and (head is None or head.weight is not embed.weight) else None
    total = sum(p.numel() for p in model.parameters() if p.requires_grad and p.dim() >= 2 and p is not skip)
    return min(total, shape.matmul_params)


def batch_token_stats(batch: dict) -> tuple[int, int]:
    """(non-pad tokens, Σ document length²) of one micro-batch, read on the host.

    Padded rows: a document per row, its length from ``attention_mask``. Packed rows (no mask,
    ``position_ids`` restarting at 0 per document): each document's length; a row's unused tail
    (``data/packing.py``: repeated pad ids, all labels -100) is neither tokens nor a document.
    """
    ids = batch["input_ids"]
    mask = batch.get("attention_mask")
    if mask is not None and mask.dim() == 2:
        lengths = mask.detach().to("cpu").sum(dim=1).tolist()
        return int(sum(lengths)), int(sum(n * n for n in lengths))
    positions = batch.get("position_ids")
    if positions is None or positions.dim() != 2:
        rows, width = ids.shape[0], ids.shape[-1]
        return rows * width, rows * width * width
    positions = positions.detach().to("cpu")
    ids = ids.detach().to("cpu")
    labels = batch.get("labels")
    labels = labels.detach().to("cpu") if labels is not None else None
    tokens = squares = 0
    width = positions.shape[1]
    for row in range(positions.shape[0]):
        starts = torch.nonzero(positions[row] == 0).flatten().tolist() or [0]
        if starts[0] != 0:
            starts.insert(0, 0)
        bounds = starts + [width]
        lengths = [b - a for a, b in zip(bounds, bounds[1:])]
        last = bounds[-2]
        if labels is not None and _is_pad_tail(ids[row, last:], labels[row, last:]):
            lengths.pop()
        tokens += sum(lengths)
        squares += sum(n * n for n in lengths)
    return tokens, squares


def _is_pad_tail(ids: torch.Tensor, labels: torch.Tensor) -> bool:
    return bool((labels == IGNORE_INDEX).all()) and bool((ids == ids[0]).all())


def _cpu_attention_formulas() -> dict:
    """Counter formulas for SDPA's CPU kernel: torch (2.13) has them for the CUDA kernels (flash,
    memory-efficient, cuDNN) but not for ``_scaled_dot_product_flash_attention_for_cpu``, so on a
    CPU the attention would be missing from the count. The same formulas as torch's CUDA entries,
    passed through FlopCounterMode's ``custom_mapping``; nothing is added where torch has its own."""
    aten = torch.ops.aten
    formulas = {}
    if hasattr(aten, "_scaled_dot_product_flash_attention_for_cpu"):
        def forward(query, key, value, *args, out_shape=None, **kwargs) -> int:
            return sdpa_flop_count(query, key, value)

        def backward(grad_out, query, key, value, *args, out_shape=None, **kwargs) -> int:
            return sdpa_backward_flop_count(grad_out, query, key, value)

        for op, formula in ((aten._scaled_dot_product_flash_attention_for_cpu, forward),
                            (aten._scaled_dot_product_flash_attention_for_cpu_backward, backward)):
            if op not in flop_registry:
                formulas[op] = formula
    return formulas


class FlopMeasure:
    """``--flop_counter``: the exact FLOPs of one optimizer step (forward + backward of all its
    micro-batches), counted from step ``start_step`` on (after warm-up, as llama-recipes). The
    count is per rank; it is printed next to the formula's figure for the same step."""

    def __init__(self, start_step: int, print_fn=print, on_measured: Optional[Callable[[dict], None]] = None):
        self.start_step = start_step
        self.print = print_fn
        self.on_measured = on_measured  # gets ``record()`` once the step is counted (metrics.json)
        self._mode: Optional[FlopCounterMode] = None
        self.flops: Optional[int] = None
        self.tflops_per_s: Optional[float] = None
        self.step: Optional[int] = None
        self.formula_flops: Optional[float] = None  # the formula's per-rank figure for that step

    @property
    def done(self) -> bool:
        return self.flops is not None

    def before_step(self, step: int) -> None:
        if not self.done and self._mode is None and step >= self.start_step:
            self._mode = FlopCounterMode(display=False, custom_mapping=_cpu_attention_formulas())
            self._mode.__enter__()

    def after_step(self, result: StepResult) -> None:
        if self._mode is None:
            return
        self._mode.__exit__(None, None, None)
        self.flops = self._mode.get_total_flops()
        self._mode = None
        self.step = result.step
        self.tflops_per_s = self.flops / 1e12 / max(result.seconds, 1e-9)
        line = (f"FLOP counter (step {result.step}): {self.flops / 1e12:.4f} TFLOPs per rank "
                f"per step, {self.tflops_per_s:.4f} TFLOP/s")
        if result.perf is not None and self.flops:
            self.formula_flops = result.perf.model_flops
            line += (f"; the model-FLOPs formula: {self.formula_flops / 1e12:.4f} TFLOPs "
                     f"({self.formula_flops / self.flops:.2f}x the count; the counter also counts pads, "
                     "recomputed forwards and adapter matmuls)")
        self.print(line)
        if self.on_measured is not None:
            self.on_measured(self.record())

    def record(self) -> Optional[dict]:
        """What metrics.json keeps of the measurement (None before it happened)."""
        if not self.done:
            return None
        return {"step": self.step, "flops_per_rank": self.flops, "tflops_per_s": self.tflops_per_s,
                "formula_flops_per_rank": self.formula_flops}

    def close(self) -> None:
        if self._mode is not None:  # training ended before the measured step completed
            self._mode.__exit__(None, None, None)
            self._mode = None
