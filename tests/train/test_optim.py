import math

import pytest
import torch

from shardtune.config import ConfigError, Scheduler, fsdp_config, train_config
from shardtune.train.optim import build_optimizer, build_scheduler, lr_factor


def lrs(scheduler_kind, steps=10, **kw):
    cfg = train_config(lr=1.0, scheduler=scheduler_kind, **kw)
    p = torch.nn.Parameter(torch.zeros(1))
    opt = build_optimizer([p], cfg, fsdp_config())
    sched = build_scheduler(opt, cfg, steps_per_epoch=4, total_steps=steps)
    out = []
    for _ in range(steps):
        out.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
    return out


def test_steplr_decays_by_gamma_each_epoch_like_llama_recipes():
    got = lrs(Scheduler.steplr, steps=9, gamma=0.5)
    assert got == pytest.approx([1, 1, 1, 1, 0.5, 0.5, 0.5, 0.5, 0.25])


def test_warmup_then_cosine_to_zero():
    got = lrs(Scheduler.cosine, steps=10, warmup_steps=2)
    assert got[:2] == pytest.approx([0.5, 1.0])
    assert got[2] == pytest.approx(1.0)
    assert got[-1] == pytest.approx(0.5 * (1 + math.cos(math.pi * 7 / 8)))
    assert all(a >= b for a, b in zip(got[2:], got[3:]))


def test_linear_and_constant():
    assert lrs(Scheduler.linear, steps=4) == pytest.approx([1, 0.75, 0.5, 0.25])
    assert lrs(Scheduler.constant, steps=3, warmup_steps=3) == pytest.approx([1 / 3, 2 / 3, 1])


def test_lr_factor_steplr_with_warmup():
    f = [lr_factor(s, scheduler=Scheduler.steplr, warmup_steps=2, steps_per_epoch=3,
                   total_steps=9, gamma=0.1) for s in range(4)]
    assert f == pytest.approx([0.5, 1.0, 1.0, 0.1])


def test_optimizer_holds_only_trainable_params():
    a, b = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(3), requires_grad=False)
    opt = build_optimizer([a, b], train_config(weight_decay=0.1), fsdp_config())
    assert opt.param_groups[0]["params"] == [a] and opt.param_groups[0]["weight_decay"] == 0.1
    with pytest.raises(ConfigError, match="No parameter is trainable"):
        build_optimizer([b], train_config(), fsdp_config())


def test_adamw_implementation_choice():
    from shardtune.config import parse_args
    from shardtune.config.configs import OptimizerImpl
    from shardtune.train.optim import adamw_kwargs

    p = [torch.nn.Parameter(torch.zeros(2))]
    assert adamw_kwargs(OptimizerImpl.auto, p) == {"fused": True}  # a CPU has the fused kernel (torch >= 2.4)
    assert adamw_kwargs(OptimizerImpl.auto, p, scaled_sharded=True) == {}  # torch's default: see build_optimizer
    assert adamw_kwargs(OptimizerImpl.foreach, p) == {"foreach": True}
    assert adamw_kwargs(OptimizerImpl.for_loop, p) == {"foreach": False}
    opt = build_optimizer(p, train_config(), fsdp_config())
    assert opt.param_groups[0]["fused"] is True
    opt = build_optimizer(p, train_config(enable_fsdp=True, use_fp16=True), fsdp_config())
    assert not opt.param_groups[0]["fused"]
    with pytest.raises(ConfigError, match="fused AdamW fails on FSDP"):
        parse_args(["--model_name", "m", "--enable_fsdp", "--use_fp16", "--optimizer_impl", "fused"])
    with pytest.raises(ConfigError, match="anyprecision has only one"):
        parse_args(["--model_name", "m", "--fsdp_config.optimizer", "anyprecision", "--optimizer_impl", "foreach"])


@pytest.mark.parametrize("impl", ["for_loop", "foreach", "fused"])
def test_every_adamw_implementation_takes_the_same_step(impl):
    from shardtune.config.configs import OptimizerImpl

    torch.manual_seed(0)
    start, grads = torch.randn(3, 5), [torch.randn(3, 5) for _ in range(3)]

    def run(which):
        p = torch.nn.Parameter(start.clone())
        opt = build_optimizer([p], train_config(lr=1e-2, weight_decay=0.1, optimizer_impl=which), fsdp_config())
        for g in grads:
            p.grad = g.clone()
            opt.step()
        return p.detach()

    torch.testing.assert_close(run(OptimizerImpl(impl)), run(OptimizerImpl.for_loop), rtol=1e-6, atol=1e-7)
