"""AnyPrecisionAdamW: AdamW whose states live in bf16, with Kahan-compensated weight updates.

With ``--fsdp_config.pure_bf16`` the weights are bf16, whose 8-bit mantissa rounds away any
update smaller than ~0.4% of the weight: late in training, plain AdamW on bf16 weights stops
moving them. Kahan summation keeps the rounding error of each update in a bf16 compensation
buffer and adds it back on the next step, so small updates accumulate as they would in fp32,
at 2 extra bytes per parameter instead of the 12 of fp32 master weights + fp32 states.
(The algorithm of torchdistx's AnyPrecisionAdamW, which llama-recipes uses; torchdistx is no
longer maintained, so it is re-implemented here on plain tensor ops, which also work on
FSDP2's sharded DTensor parameters.)
"""

from __future__ import annotations

import math
from typing import Iterable

import torch
from torch.optim import Optimizer


class AnyPrecisionAdamW(Optimizer):
    def __init__(self, params: Iterable, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0, use_kahan_summation: bool = True,
                 momentum_dtype: torch.dtype = torch.bfloat16,
                 variance_dtype: torch.dtype = torch.bfloat16,
                 compensation_buffer_dtype: torch.dtype = torch.bfloat16) -> None:
        if lr <= 0 or eps <= 0 or not (0 <= betas[0] < 1 and 0 <= betas[1] < 1):
            raise ValueError(f"invalid AnyPrecisionAdamW settings lr={lr} eps={eps} betas={betas}")
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                        use_kahan_summation=use_kahan_summation, momentum_dtype=momentum_dtype,
                        variance_dtype=variance_dtype,
                        compensation_buffer_dtype=compensation_buffer_dtype)
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            lr, eps, decay = group["lr"], group["eps"], group["weight_decay"]
            kahan = group["use_kahan_summation"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("AnyPrecisionAdamW does not support sparse gradients")
                state = self.state[p]
                if not state:
                    state["step"] = torch.tensor(0.0)
                    state["exp_avg"] = torch.zeros_like(p, dtype=group["momentum_dtype"])
                    state["exp_avg_sq"] = torch.zeros_like(p, dtype=group["variance_dtype"])
                    if kahan:
                        state["compensation"] = torch.zeros_like(p, dtype=group["compensation_buffer_dtype"])
                state["step"] += 1
                step = float(state["step"])
                grad = p.grad
                exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
                if decay:
                    p.mul_(1 - lr * decay)  # decoupled weight decay, as AdamW
                exp_avg.mul_(beta1).add_(grad, alpha=1 - beta1)
                exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
                step_size = lr / (1 - beta1 ** step)
                denom = (exp_avg_sq.sqrt() / math.sqrt(1 - beta2 ** step)).add_(eps)
                if kahan:
                    # Add the update to the running compensation, apply it, and keep what the
                    # weights' precision could not absorb for the next step.
                    comp = state["compensation"]
                    comp.addcdiv_(exp_avg, denom, value=-step_size)
                    before = p.detach().clone()
                    p.add_(comp)
                    comp.add_(before.sub_(p))
                else:
                    p.addcdiv_(exp_avg, denom, value=-step_size)
        return loss
