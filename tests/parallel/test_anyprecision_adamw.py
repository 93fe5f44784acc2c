from __future__ import annotations

import torch

from shardtune.parallel.anyprecision_adamw import AnyPrecisionAdamW


def _run(opt_cls, param: torch.nn.Parameter, steps: int, **kw) -> torch.Tensor:
    opt = opt_cls([param], **kw)
    for _ in range(steps):
        param.grad = torch.ones_like(param)
        opt.step()
    return param.detach()


def test_fp32_states_without_kahan_equal_torch_adamw():
    torch.manual_seed(0)
    start = torch.randn(16)
    grads = [torch.randn(16) for _ in range(5)]
    a = torch.nn.Parameter(start.clone())
    b = torch.nn.Parameter(start.clone())
    ours = AnyPrecisionAdamW([a], lr=1e-2, weight_decay=0.1, use_kahan_summation=False,
                             momentum_dtype=torch.float32, variance_dtype=torch.float32)
    ref = torch.optim.AdamW([b], lr=1e-2, weight_decay=0.1)
    for g in grads:
        a.grad, b.grad = g.clone(), g.clone()
        ours.step()
        ref.step()
    torch.testing.assert_close(a.detach(), b.detach(), rtol=1e-6, atol=1e-7)


def test_kahan_summation_keeps_updates_that_bf16_weights_would_round_away():
    # Each update (lr 1e-4 on a weight of 1.0) is below bf16's resolution there (2**-7).
    plain = _run(AnyPrecisionAdamW, torch.nn.Parameter(torch.ones(4, dtype=torch.bfloat16)), 200,
                 lr=1e-4, use_kahan_summation=False)
    kahan = _run(AnyPrecisionAdamW, torch.nn.Parameter(torch.ones(4, dtype=torch.bfloat16)), 200,
                 lr=1e-4, use_kahan_summation=True)
    assert torch.all(plain == 1.0)  # every update was lost
    # 200 steps of ~1e-4 should move the weight by ~0.02; Kahan gets there within bf16 precision.
    assert torch.allclose(kahan.float(), torch.full((4,), 1.0 - 0.02), atol=2 ** -7)


def test_states_are_bf16():
    p = torch.nn.Parameter(torch.ones(3, dtype=torch.bfloat16))
    opt = AnyPrecisionAdamW([p], lr=1e-3)
    p.grad = torch.ones_like(p)
    opt.step()
    state = opt.state[p]
    assert {state[k].dtype for k in ("exp_avg", "exp_avg_sq", "compensation")} == {torch.bfloat16}
