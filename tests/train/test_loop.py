"""The train/eval loops on a real tiny Llama: learning, token-exact accumulation, limits."""

import copy

import pytest
import torch
from transformers import AutoModelForCausalLM

from shardtune.config import train_config
from shardtune.parallel.distributed import DistEnv
from shardtune.train.loop import IGNORE_INDEX, evaluate, loss_sum, train_epoch
from shardtune.train.metrics import MetricsLog
from shardtune.train.optim import build_scheduler


def make_batches(n_batches, batch_size, vocab, seed=0, max_len=12):
    """Right-padded batches of varying lengths with prompt-masked labels."""
    g = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(n_batches):
        lengths = torch.randint(4, max_len + 1, (batch_size,), generator=g)
        width = int(lengths.max())
        ids = torch.randint(4, vocab, (batch_size, width), generator=g)
        mask = (torch.arange(width)[None] < lengths[:, None]).long()
        labels = ids.clone()
        labels[:, :2] = IGNORE_INDEX  # a "prompt"
        labels[mask == 0] = IGNORE_INDEX
        ids[mask == 0] = 3
        batches.append({"input_ids": ids, "attention_mask": mask, "labels": labels})
    return batches


def pad_cat(batches):
    width = max(b["input_ids"].shape[1] for b in batches)
    out = {}
    for key, fill in (("input_ids", 3), ("attention_mask", 0), ("labels", IGNORE_INDEX)):
        out[key] = torch.cat([torch.nn.functional.pad(b[key], (0, width - b[key].shape[1]), value=fill)
                              for b in batches])
    return out


def run(model, batches, accumulation, lr=1e-2, optimizer=torch.optim.AdamW, **kw):
    opt = optimizer(model.parameters(), lr=lr)
    sched = build_scheduler(opt, train_config(scheduler="constant"), steps_per_epoch=10, total_steps=10)
    return train_epoch(model, batches, opt, sched, env=DistEnv(), epoch=0, start_step=0,
                       accumulation_steps=accumulation, **kw)


@pytest.fixture
def model(tiny_model_dir):
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_pretrained(tiny_model_dir)


def test_loss_decreases_on_repeated_batch(model):
    batch = make_batches(1, 4, model.config.vocab_size)
    metrics = MetricsLog()
    run(model, batch * 15, accumulation=1, hooks=[metrics])
    assert metrics.train_step_loss[-1] < 0.5 * metrics.train_step_loss[0]
    assert metrics.train_step == list(range(1, 16))


def test_accumulating_k_micro_batches_equals_one_k_times_larger_batch(model):
    micro = make_batches(4, 2, model.config.vocab_size, seed=1)
    a, b = copy.deepcopy(model), copy.deepcopy(model)
    # SGD: the update is linear in the gradient, so equal updates mean equal gradients
    # (Adam's first step is ~sign(g) and would amplify float noise in near-zero gradients).
    ra = run(a, micro, accumulation=4, lr=1.0, optimizer=torch.optim.SGD)
    rb = run(b, [pad_cat(micro)], accumulation=1, lr=1.0, optimizer=torch.optim.SGD)
    assert ra.steps == rb.steps == 1
    assert ra.loss == pytest.approx(rb.loss, rel=1e-6)
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb, atol=1e-6, rtol=1e-5, msg=name)
    assert not torch.equal(a.lm_head.weight, model.lm_head.weight)  # it did train


def test_loss_is_token_mean_over_label_tokens(model):
    batch = make_batches(1, 3, model.config.vocab_size, seed=2)[0]
    with torch.no_grad():
        summed = loss_sum(model, batch)
        hf = model(**{k: batch[k] for k in ("input_ids", "attention_mask")}, labels=batch["labels"]).loss
    n = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
    assert float(summed / n) == pytest.approx(float(hf), rel=1e-5)


def test_max_steps_and_last_short_group(model):
    batches = make_batches(5, 2, model.config.vocab_size)
    assert run(copy.deepcopy(model), batches, accumulation=2).steps == 3  # 2 + 2 + 1
    assert run(copy.deepcopy(model), batches, accumulation=1, max_steps=2).steps == 2


def test_eval_averages_over_steps_actually_run(model):
    batches = make_batches(4, 2, model.config.vocab_size, seed=3)
    first_two = evaluate(model, batches, env=DistEnv(), max_steps=2)
    with torch.no_grad():
            manual = sum(float(loss_sum(model, b)) for b in batches[:2]) / sum(
        int((b["labels"][:, 1:] != IGNORE_INDEX).sum()) for b in batches[:2])
    assert first_two.steps == 2
    assert first_two.loss == pytest.approx(manual, rel=1e-5)
    assert first_two.perplexity == pytest.approx(torch.exp(torch.tensor(manual)).item(), rel=1e-5)


def test_gradient_clipping_is_applied(model):
    batch = make_batches(1, 2, model.config.vocab_size)
    norms = []

    def clip():
        n = torch.nn.utils.clip_grad_norm_(model.parameters(), 1e-3)
        norms.append(torch.nn.utils.clip_grad_norm_(model.parameters(), 1e9))
        return n

    run(model, batch, accumulation=1, clip_grad=clip)
    assert float(norms[0]) == pytest.approx(1e-3, rel=1e-3)


@pytest.mark.parametrize("fp16", [False, True])
def test_non_finite_steps_stop_before_the_update_or_are_skipped(model, fp16):
    from shardtune.train.loop import NonFiniteStep, Precision

    batches = make_batches(3, 2, model.config.vocab_size)
    with torch.no_grad():
        model.model.norm.weight[0] = float("nan")  # every logit NaN: a non-finite loss
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    precision = Precision("cpu", torch.float16 if fp16 else None, torch.amp.GradScaler("cpu") if fp16 else None)
    with pytest.raises(NonFiniteStep, match="stopped at step 1 .*the loss is nan"):
        run(model, batches, accumulation=1, precision=precision)
    assert all(torch.allclose(before[n], p, rtol=0, atol=0, equal_nan=True) for n, p in model.named_parameters())
    seen = []

    class Hook:
        def before_step(self, step):
            pass

        def after_step(self, result):
            seen.append((result.step, result.skipped))

    log = MetricsLog()
    result = run(model, batches, accumulation=1, precision=precision, on_non_finite="skip", hooks=[log, Hook()])
    assert result.steps == 3 and seen == [(1, True), (2, True), (3, True)]  # hooks see every step
    assert log.train_step_loss == []  # skipped steps stay out of the curves
    assert all(torch.allclose(before[n], p, rtol=0, atol=0, equal_nan=True) for n, p in model.named_parameters())
