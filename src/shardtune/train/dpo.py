"""Preference tuning: the DPO (sigmoid) and IPO losses on chosen / rejected pairs (``--use_dpo``).

A preference batch (``data/preference.py``) holds B pairs as 2B rows of one padded batch: rows
``0..B-1`` are the chosen responses, rows ``B..2B-1`` the rejected ones, so a step runs one
forward of the policy (and one, without gradients, of the reference) for both. A sequence's
log-probability is the sum of its response tokens' log-probabilities (labels other than -100).

With ``pi`` the policy's and ``ref`` the reference's log-probabilities, the pair's log-ratio margin
is ``h = (pi_c - pi_r) - (ref_c - ref_r)`` and

* sigmoid (DPO, Rafailov et al. 2023): ``-(1-e) log σ(β h) - e log σ(-β h)`` (``e``: label
  smoothing, cDPO); ``ln 2`` when the policy is the reference (``h = 0``);
* ipo (IPO, Azar et al. 2023): ``(h̄ - 1/(2β))²`` with ``h̄`` the same margin of *per-token
  averaged* log-ratios (each response's log-ratio divided by its number of response tokens), as
  TRL's DPOTrainer, whose authors confirmed with the IPO authors that the paper's results use this
  normalised form (a summed margin makes the squared loss, and the β that suits it, scale with the
  response length); ``1/(4β²)`` when ``h̄ = 0``. The sigmoid loss keeps summed log-probabilities (the
  DPO paper and TRL).

Rewards are ``β (pi - ref)`` of each response, detached; the margin is chosen minus rejected
reward; accuracy is the share of pairs whose chosen reward is strictly above the rejected one.

The train loop (``train/loop.py``) normalises a step's loss by what ``count`` returns — here pairs,
not label tokens — summed over micro-batches and ranks, so a step's loss is the mean over the
global batch's pairs and 2 ranks equal one process with the same global batch.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from ..batches import CAUSAL_PADDING, REFERENCE_LOGPS
from ..config.configs import PreferenceLoss, dpo_config
from ..batches import IGNORE_INDEX
from .loss import final_hidden_states

# The per-pair figures, averaged over a step's (or an evaluation's) pairs: metrics.json keys
# ``train_step_<name>`` and ``val_<name>``, TensorBoard/W&B ``train/<name>`` and ``eval/<name>``.
PREFERENCE_METRICS = ("rewards_chosen", "rewards_rejected", "reward_margin", "reward_accuracy")
# The model's inputs in a preference batch (the rest are labels and markers).
_INPUTS = ("input_ids", "attention_mask")



def preference_losses(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
                      ref_rejected: torch.Tensor, *, beta: float, loss_type: PreferenceLoss,
                      label_smoothing: float = 0.0, chosen_tokens: Optional[torch.Tensor] = None,
                      rejected_tokens: Optional[torch.Tensor] = None,
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(per-pair losses, chosen rewards, rejected rewards) from per-pair sequence log-probabilities
    (sums over the response tokens). IPO needs each response's token count (``response_tokens``)."""
    if PreferenceLoss(loss_type) is PreferenceLoss.ipo:
        if chosen_tokens is None or rejected_tokens is None:
            raise ValueError("the IPO loss averages each response's log-ratio per token: pass its token counts")
        # clamp: a filler pair has no response token (its loss is masked out by valid_pairs anyway)
        h_mean = ((policy_chosen - ref_chosen) / chosen_tokens.clamp(min=1)
                  - (policy_rejected - ref_rejected) / rejected_tokens.clamp(min=1))
        losses = (h_mean - 1.0 / (2.0 * beta)) ** 2
    else:
        h = (policy_chosen - policy_rejected) - (ref_chosen - ref_rejected)
        losses = -(1.0 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h)
    return losses, beta * (policy_chosen - ref_chosen).detach(), beta * (policy_rejected - ref_rejected).detach()


def sequence_logps(model: nn.Module, inputs: dict, labels: torch.Tensor,
                   chunk_tokens: Optional[int] = None) -> torch.Tensor:
    """Per row, the sum of log p(label) over the row's label tokens (shifted by one), in fp32.

    ``chunk_tokens``: the head and log-softmax a chunk of label positions at a time, each chunk
    recomputed in the backward (as ``--loss chunked`` in train/loss.py), so the full-vocabulary
    logits of the batch are never held; None: transformers' way, the whole batch's logits."""
    shift_labels = labels[:, 1:]
    keep = shift_labels != IGNORE_INDEX
    if chunk_tokens is None:
        logits = model(**inputs, use_cache=False).logits[:, :-1, :].float()
        token = -F.cross_entropy(logits.transpose(1, 2), shift_labels.clamp(min=0), reduction="none")
        return (token * keep).sum(dim=1)
    head = model.get_output_embeddings()
    hidden = final_hidden_states(model, inputs)
    rows = keep.nonzero()[:, 0]
    states, targets = hidden[:, :-1][keep], shift_labels[keep]
    out = torch.zeros(labels.shape[0], dtype=torch.float32, device=hidden.device)
    # keeps the head in the backward even without a label (FSDP ranks must reduce the same gradients)
    out = out + head(hidden[:, :1]).float().sum() * 0.0
    for start in range(0, targets.numel(), chunk_tokens):
        end = start + chunk_tokens
        args = (head, states[start:end], targets[start:end])
        logps = checkpoint(_head_logps, *args, use_reentrant=False) if torch.is_grad_enabled() else _head_logps(*args)
        out = out.index_add(0, rows[start:end], logps)
    return out


def _head_logps(head: nn.Module, states: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return -F.cross_entropy(head(states).float(), targets, reduction="none")


def response_tokens(labels: torch.Tensor) -> torch.Tensor:
    """Per row, its number of label tokens (those ``sequence_logps`` sums over), as float."""
    return (labels[:, 1:] != IGNORE_INDEX).sum(dim=1).to(torch.float32)


def valid_pairs(labels: torch.Tensor) -> torch.Tensor:
    """[pairs] bool: both responses have a label token. A filler pair (collate.MaskFillers masks the
    labels of its first row, the chosen one) is not a pair: no loss, not counted."""
    has = (labels[:, 1:] != IGNORE_INDEX).any(dim=1)
    n = labels.shape[0] // 2
    return has[:n] & has[n:]


class AdapterOffReference:
    """LoRA / LLaMA-Adapter / QLoRA: the reference is the policy with its adapters disabled
    (peft's ``disable_adapter()``), so there is no second copy of the base in memory."""

    def logps(self, policy: nn.Module, inputs: dict, labels: torch.Tensor, chunk_tokens: Optional[int]) -> torch.Tensor:
        with torch.no_grad(), policy.disable_adapter():
            return sequence_logps(policy, inputs, labels, chunk_tokens)


class FrozenReference:
    """Full-parameter runs: a frozen copy of the starting model (built and sharded like the policy,
    on the same mesh; no gradients, no optimizer state), run without gradients."""

    def __init__(self, model: nn.Module, after_forward: Callable[[nn.Module], None] = lambda m: None) -> None:
        self.model = model.requires_grad_(False).eval()
        self.after_forward = after_forward  # FSDP: free the gathered root (parallel.fsdp.reshard)

    def logps(self, policy: nn.Module, inputs: dict, labels: torch.Tensor, chunk_tokens: Optional[int]) -> torch.Tensor:
        with torch.no_grad():
            out = sequence_logps(self.model, inputs, labels, chunk_tokens)
        self.after_forward(self.model)
        return out


class PreferenceObjective:
    """The loop's loss function for ``--use_dpo``: ``objective(model, batch)`` runs the reference
    and the policy on the batch and returns the summed loss of its pairs; ``count(batch)`` is its
    number of pairs (the loop's normaliser); ``reset()`` / ``reduce(all_reduce_sum)`` collect the
    rewards, margin and accuracy of the pairs seen since the last reset, over all ranks."""

    def __init__(self, config: dpo_config, reference, chunk_tokens: Optional[int] = None) -> None:
        self.config, self.reference, self.chunk_tokens = config, reference, chunk_tokens
        self._sums: Optional[torch.Tensor] = None  # chosen rewards, rejected rewards, correct, pairs

    def __call__(self, model: nn.Module, batch: dict) -> torch.Tensor:
        inputs = {k: batch[k] for k in _INPUTS if k in batch}
        if batch.get(CAUSAL_PADDING):  # right padding without labels: the causal mask alone is exact
            inputs.pop("attention_mask", None)
        labels = batch["labels"]
        n = labels.shape[0] // 2
        if REFERENCE_LOGPS in batch:  # --dpo_config.precompute_reference
            ref = batch[REFERENCE_LOGPS].to(torch.float32)
        elif self.config.precompute_reference:  # the policy would silently serve as its own reference
            raise RuntimeError("--dpo_config.precompute_reference: a batch came without the precomputed reference "
                               "log-probabilities (were the loader's workers started before they were computed?)")
        else:
            ref = self.reference.logps(model, inputs, labels, self.chunk_tokens)
        policy = sequence_logps(model, inputs, labels, self.chunk_tokens)
        c = self.config
        tokens = response_tokens(labels)
        losses, chosen, rejected = preference_losses(policy[:n], policy[n:], ref[:n], ref[n:], beta=c.beta,
                                                     loss_type=c.loss_type, label_smoothing=c.label_smoothing,
                                                     chosen_tokens=tokens[:n], rejected_tokens=tokens[n:])
        valid = valid_pairs(labels).to(losses.dtype)
        sums = torch.stack([(chosen * valid).sum(), (rejected * valid).sum(),
                            ((chosen > rejected).to(valid.dtype) * valid).sum(), valid.sum()]).double()
        self._sums = sums if self._sums is None else self._sums + sums
        return (losses * valid).sum()

    @staticmethod
    def count(batch: dict) -> int:
        return int(valid_pairs(batch["labels"]).sum())

    def reset(self) -> None:
        self._sums = None

    def reduce(self, all_reduce_sum: Callable[[torch.Tensor], object], device: torch.device) -> dict[str, float]:
        """The means over every rank's pairs since ``reset`` (a collective: every rank calls it)."""
        sums = self._sums if self._sums is not None else torch.zeros(4, dtype=torch.float64, device=device)
        sums = sums.detach().to(device=device, dtype=torch.float64).clone()
        all_reduce_sum(sums)
        chosen, rejected, correct, pairs = sums.tolist()
        self._sums = None
        if pairs == 0:
            return {}
        return dict(zip(PREFERENCE_METRICS, (chosen / pairs, rejected / pairs, (chosen - rejected) / pairs,
                                             correct / pairs)))


class StartingModelReference:
    """The reference of a full-parameter run *before its first update*: the policy itself, without
    gradients. Only for ``precompute_reference_logps`` at start-up (training changes the policy)."""

    def logps(self, policy: nn.Module, inputs: dict, labels: torch.Tensor, chunk_tokens: Optional[int]) -> torch.Tensor:
        with torch.no_grad():
            return sequence_logps(policy, inputs, labels, chunk_tokens)


def build_objective(config: dpo_config, model: nn.Module, *, chunk_tokens: Optional[int],
                    frozen_copy: Callable[[], nn.Module],
                    after_forward: Callable[[nn.Module], None] = lambda m: None) -> PreferenceObjective:
    """The objective with its reference: ``model``'s adapters off when it is a peft model (LoRA,
    LLaMA-Adapter, QLoRA), else a frozen copy that ``frozen_copy()`` builds (full-parameter runs).
    With ``precompute_reference`` no copy is built: the batches carry the reference's log-probabilities
    (``precompute_reference_logps``), and the reference kept is only what computed them."""
    if callable(getattr(model, "disable_adapter", None)):
        return PreferenceObjective(config, AdapterOffReference(), chunk_tokens)
    if config.precompute_reference:
        return PreferenceObjective(config, StartingModelReference(), chunk_tokens)
    return PreferenceObjective(config, FrozenReference(frozen_copy(), after_forward), chunk_tokens)


@torch.no_grad()
def precompute_reference_logps(model: nn.Module, samples: list, reference, *, collate: Callable[[list], dict],
                               batch_size: int, rank: int, world_size: int, device: torch.device,
                               all_reduce_sum: Callable[[torch.Tensor], object],
                               chunk_tokens: Optional[int] = None) -> torch.Tensor:
    """--dpo_config.precompute_reference: the reference's log-probabilities of every pair of
    ``samples``, ``[pairs, 2]`` (chosen, rejected), in one pass before training. Every rank runs the same number of batches (FSDP's collectives): rank r takes its slice
    of each global batch of ``batch_size x world_size`` pairs, or a repeated pair whose result is not
    kept, and the values are summed over ranks so every rank holds all of them."""
    was_training = model.training
    model.eval()
    n = len(samples)
    out = torch.zeros(n, 2, dtype=torch.float64, device=device)
    size = batch_size * world_size
    for start in range(0, n, size):
        part = list(range(start, min(start + size, n)))
        mine = part[rank * batch_size:(rank + 1) * batch_size]
        batch = collate([samples[i] for i in (mine or part[:1])])
        batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
        inputs = {k: batch[k] for k in _INPUTS if k in batch}
        if batch.get(CAUSAL_PADDING):
            inputs.pop("attention_mask", None)
        logps = reference.logps(model, inputs, batch["labels"], chunk_tokens).double()
        if mine:
            k = len(mine)
            out[mine] = torch.stack([logps[:k], logps[k:]], dim=1)
    all_reduce_sum(out)
    model.train(was_training)
    return out.cpu()
