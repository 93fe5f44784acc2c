"""Activation memory of one micro-batch on one rank, per decoder layer and in total (estimated;
derived for transformers' Llama decoder layer, and checked against the measured peak of real CPU
steps in tests/plan/test_activations.py).

Per decoder layer, for ``N = batch x context_length`` tokens, compute dtype of ``a`` bytes (2 for
bf16/fp16, 4 for fp32), hidden ``h``, query width ``hq = heads x head_dim``, key/value width
``hk``, MLP width ``I``, autograd keeps (what ``saved_tensors_hooks`` sees, measured):

* each RMSNorm: its input upcast to fp32 ``4·N·h`` and ``rsqrt`` ``4·N``; the normalised value
  ``a·N·h`` only if the norm's weight trains; its output ``a·N·h`` only if a consumer keeps it
  (a trainable projection, or a LoRA without dropout);
* attention: ``q`` ``a·N·hq``, ``k`` and ``v`` ``a·N·hk`` each, the output ``a·N·hq`` (o_proj's
  input is the same storage) and the fp32 log-sum-exp ``4·batch·heads·seq`` (SDPA's causal kernel
  and flash-attn; padded batches from the built-in collator run without a mask, so no KV heads are
  repeated and no additive mask is made). Packed
  runs with SDPA use the per-document kernel (``model/packed_attention.py``): it keeps ``q``,
  ``k``, ``v`` and the output grouped by document length (``S`` slots: the tokens, each document
  rounded up to a multiple of 64), the log-sum-exp ``4·heads·S``, and the output back in token
  order ``a·N·hq`` if ``o_proj`` keeps its input (it trains, or has a LoRA without dropout); no
  KV repetition and no per-layer mask, but transformers still builds the boolean block mask
  ``batch·seq²`` once per forward;
* MLP: ``gate`` output, ``silu`` output and ``up`` output ``3·a·N·I``, plus the ``down_proj``
  input ``a·N·I`` if ``down_proj`` trains;
* each LoRA adapter: its dropout output ``a·N·in`` and mask ``N·in`` (a bool on CUDA; on a CPU
  dropout keeps its scaled noise, ``a·N·in``), none of both when dropout is 0 (``lora_A`` then
  keeps the layer's input), and ``lora_A``'s output ``a·N·r``.

Frozen projections keep nothing (a matmul keeps its input only to compute its weight's
gradient), so LoRA needs less than full fine-tuning even without checkpointing. The loss part
(``train/loss.py``) with ``--loss plain`` is ``12·N·vocab`` bytes at its peak (the logits, their
fp32 copy and ``log_softmax``'s output in the forward; the fp32 gradients in the backward); with
``--loss chunked`` (the default) it is the same for one chunk of ``C = --loss_chunk_tokens``
label tokens, ``12·min(C, N)·vocab``, plus the label positions' final hidden states ``a·N·h``
(every token counted: the planner does not know how many are prompt or pad).

Peak without activation checkpointing: all layers' saved tensors + the final norm's + the loss
part. With it (``--fsdp_config.fsdp_activation_checkpointing``, each decoder layer): every
layer's input ``a·N·h`` + the loss part in the forward, and in the backward those inputs + one
layer's saved tensors while it is recomputed + the backward's working set ``a·N·(3·I + h)`` (the
gradients in its MLP; ``down_proj``'s saved input is freed by then). The tests check these
against the measured peak of real CPU steps (within 15%; docs/benchmarks.md has the figures).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

import torch

from ..config import Config
from ..model.attention import SDPA, choose_attention
from ..model.packed_attention import BUCKET, PACKED_SDPA
from .shapes import ATTN_IN, MLP_IN, LayerGrads, LoraModule, ModelShapes


@dataclass(frozen=True)
class Attention:
    kernel: str  # "sdpa" | PACKED_SDPA | "flash_attention_2"
    mask: bool  # transformers builds a boolean block mask once per forward (packing with SDPA)

    def describe(self) -> str:
        if self.kernel == PACKED_SDPA:
            return "SDPA per group of documents (no per-layer mask, KV heads not repeated)"
        if self.kernel != SDPA:
            return f"{self.kernel} (no mask, KV heads not repeated)"
        return "SDPA, causal"


def attention_for(cfg: Config, device_type: str, compute_dtype: torch.dtype) -> Attention:
    """The kernel ``model/attention.py`` picks (assuming flash-attn is installed on the GPU machine
    when ``--use_fast_kernels`` asks for it), and whether a mask is built: padded batches from the
    built-in collator run on the causal mask alone (``causal_padding``: right pads without labels);
    packed rows with SDPA always build one (transformers builds the block mask from the
    ``position_ids``, which the per-document kernel then does not use). The planner models text
    Llama runs, whose datasets use the built-in padding collator."""
    t = cfg.train
    packing = t.batching_strategy.value == "packing"
    kernel = choose_attention(t.use_fast_kernels, torch.device(device_type), compute_dtype,
                              flash_installed=True, packing=packing).implementation
    return Attention(kernel, mask=kernel == PACKED_SDPA)


def _norm(terms: dict, prefix: str, n: int, h: int, a: int, x_grad: bool, weight_trains: bool) -> None:
    if x_grad:
        terms[f"{prefix}: input in fp32 + rsqrt"] = 4 * n * h + 4 * n
    if weight_trains:
        terms[f"{prefix}: normalised value"] = a * n * h


def _lora_terms(terms: dict, name: str, lora: LoraModule, n: int, a: int, input_grad: bool, mask: int) -> None:
    if lora.dropout:
        terms[f"{name} LoRA dropout output + mask"] = n * lora.in_features * (a + (mask if input_grad else 0))
    terms[f"{name} lora_A output"] = a * n * lora.r


def _keeps_input(lg: LayerGrads, name: str) -> bool:
    """Whether projection ``name`` keeps its input for backward: its weight trains, or it has a
    LoRA without dropout (whose ``lora_A`` then keeps the same input)."""
    return name in lg.trainable or (name in lg.lora and not lg.lora[name].dropout)


def _normed_inputs(terms: dict, lg: LayerGrads, names: tuple[str, str, str], projections: tuple[str, ...],
                   n: int, h: int, a: int, input_grad: bool, mask: int) -> bool:
    """A pre-norm sub-block's input side: the norm, its output if a projection keeps it, and the
    projections' LoRA terms. ``names``: (label, the norm's parameter name, what its output feeds).
    Returns whether the normed value needs a gradient."""
    label, norm, feeds = names
    _norm(terms, label, n, h, a, input_grad, norm in lg.trainable)
    z_grad = input_grad or norm in lg.trainable
    if any(_keeps_input(lg, m) for m in projections):
        terms[f"{label}: output ({feeds})"] = a * n * h
    for m in projections:
        if m in lg.lora:
            _lora_terms(terms, m, lg.lora[m], n, a, z_grad, mask)
    return z_grad


def layer_saved(shapes: ModelShapes, lg: LayerGrads, *, tokens: int, batch: int, seq: int, a: int,
                input_grad: bool, attention: Attention, mask: int = 1) -> tuple[dict[str, int], bool]:
    """Bytes one decoder layer keeps for backward, by tensor; and whether its output needs a gradient."""
    n, h, inter = tokens, shapes.hidden, shapes.intermediate
    hq, hk = shapes.heads * shapes.head_dim, shapes.kv_heads * shapes.head_dim
    trains = lambda name: name in lg.trainable or name in lg.lora  # noqa: E731
    terms: dict[str, int] = {}
    z1_grad = _normed_inputs(terms, lg, ("attention norm", "input_layernorm", "projection input"), ATTN_IN,
                             n, h, a, input_grad, mask)
    attn_grad = z1_grad or any(trains(m) for m in ATTN_IN)
    if attn_grad and attention.kernel == PACKED_SDPA:
        slots = batch * math.ceil(seq / BUCKET) * BUCKET  # one document per row: the planner's bound
        terms["q, k, v grouped by document length"] = a * slots * (hq + 2 * hk)
        terms["attention output (grouped)"] = a * slots * hq
        terms["log-sum-exp (fp32)"] = 4 * shapes.heads * slots
        # back in token order: a new tensor, kept only by an o_proj that needs its input
        if _keeps_input(lg, "o_proj"):
            terms["attention output in token order (o_proj input)"] = a * n * hq
    elif attn_grad:
        terms["q, k, v (after rotary)"] = a * n * (hq + 2 * hk)
        terms["attention output"] = a * n * hq
        terms["log-sum-exp (fp32)"] = 4 * batch * shapes.heads * seq
    if "o_proj" in lg.lora:
        _lora_terms(terms, "o_proj", lg.lora["o_proj"], n, a, attn_grad, mask)
    h1_grad = attn_grad or trains("o_proj")
    z2_grad = _normed_inputs(terms, lg, ("MLP norm", "post_attention_layernorm", "gate/up input"), MLP_IN,
                             n, h, a, h1_grad, mask)
    mlp_grad = z2_grad or any(trains(m) for m in MLP_IN)
    if mlp_grad:
        terms["gate, silu(gate), up"] = 3 * a * n * inter
    if _keeps_input(lg, "down_proj"):
        terms["down_proj input"] = a * n * inter
    if "down_proj" in lg.lora:
        _lora_terms(terms, "down_proj", lg.lora["down_proj"], n, a, mlp_grad, mask)
    return terms, mlp_grad or trains("down_proj")


@dataclass(frozen=True)
class Activations:
    """Peak bytes of activations and backward temporaries of one micro-batch on one rank."""

    without_ac: int
    with_ac: int
    per_layer: int  # the largest layer's saved tensors
    loss: int  # the logits / log_softmax part
    layer_terms: dict = field(default_factory=dict)  # the largest layer's, by tensor

    def for_run(self, checkpointing: bool) -> int:
        return self.with_ac if checkpointing else self.without_ac


def activation_bytes(shapes: ModelShapes, *, batch: int, seq: int, a: int, attention: Attention,
                     dropout_mask: int = 1, loss_chunk_tokens: Optional[int] = None) -> Activations:
    """Peak activation memory of one micro-batch of ``batch`` rows of ``seq`` tokens, with and
    without per-layer activation checkpointing (see the module docstring for the formula).
    ``dropout_mask``: bytes per element of a dropout mask (1: CUDA's fused kernel keeps a bool
    mask; on a CPU dropout keeps its scaled noise in the activations' dtype);
    ``loss_chunk_tokens``: None for ``--loss plain``, else ``--loss_chunk_tokens``."""
    n = batch * seq
    grad = shapes.embed_trainable
    layers, biggest, biggest_terms = [], 0, {}
    for lg in shapes.layer_grads:
        terms, grad = layer_saved(shapes, lg, tokens=n, batch=batch, seq=seq, a=a, input_grad=grad,
                                  attention=attention, mask=dropout_mask)
        total = sum(terms.values())
        layers.append(total)
        if total >= biggest:
            biggest, biggest_terms = total, terms
    final: dict[str, int] = {}
    _norm(final, "final norm", n, shapes.hidden, a, grad, shapes.final_norm_trainable)
    if shapes.head_trainable and not (shapes.head_lora and shapes.head_lora.dropout):
        final["head input"] = a * n * shapes.hidden
    if shapes.head_lora:
        _lora_terms(final, "lm_head", shapes.head_lora, n, a, grad, dropout_mask)
    if loss_chunk_tokens is None:
        loss = 12 * n * shapes.vocab
    else:  # one chunk's logits at a time, and the label positions' hidden states
        loss = 12 * min(loss_chunk_tokens, n) * shapes.vocab + a * n * shapes.hidden
    shared = 2 * a * n * shapes.head_dim  # rotary cos and sin
    if attention.mask:
        shared += batch * seq * seq  # the boolean mask all layers share
    # One layer's backward at its peak, in the MLP: the gradients of down_proj's input, of silu's
    # output and of up's output (3·a·N·I) and of the hidden state, next to the layer's saved
    # tensors less down_proj's input, which its backward has freed by then.
    workspace = a * n * (3 * shapes.intermediate + shapes.hidden)
    freed = biggest_terms.get("down_proj input", 0)
    saved_all = sum(layers)
    without = shared + saved_all + max(sum(final.values()) + loss, workspace - freed)
    inputs = shapes.layers * a * n * shapes.hidden  # what the checkpoints keep
    # in fp32 the norm's saved input is the checkpointed input itself, not a copy
    overlap = 4 * n * shapes.hidden if a == 4 else 0
    forward = shared + inputs + sum(final.values()) + loss
    backward = shared + inputs + biggest - freed - overlap + workspace
    return Activations(without_ac=without, with_ac=max(forward, backward), per_layer=biggest, loss=loss,
                       layer_terms=biggest_terms)
