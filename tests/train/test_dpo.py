"""train/dpo.py: the DPO and IPO losses, sequence log-probabilities (plain and chunked), the
adapters-off reference on a real peft model, and the pair count and reward figures."""

from __future__ import annotations

import math

import pytest
import torch

from shardtune.config.configs import PreferenceLoss, dpo_config
from shardtune.data.preference import PreferenceCollator, encode
from shardtune.train.dpo import (AdapterOffReference, FrozenReference, PreferenceObjective, preference_losses,
                                 sequence_logps)


def test_sigmoid_loss_is_ln2_and_ipo_is_a_quarter_over_beta_squared_when_policy_is_reference():
    lp = torch.tensor([-3.0, -7.5])
    for beta in (0.1, 0.5):
        sig, rc, rr = preference_losses(lp[:1], lp[1:], lp[:1], lp[1:], beta=beta, loss_type="sigmoid")
        assert math.isclose(float(sig), math.log(2), rel_tol=1e-7) and float(rc) == float(rr) == 0
        ipo, _, _ = preference_losses(lp[:1], lp[1:], lp[:1], lp[1:], beta=beta, loss_type=PreferenceLoss.ipo,
                                      chosen_tokens=torch.tensor([3.0]), rejected_tokens=torch.tensor([5.0]))
        assert math.isclose(float(ipo), (1 / (2 * beta)) ** 2, rel_tol=1e-6)


def test_losses_and_rewards_follow_the_formulas():
    pc, pr, rc, rr = (torch.tensor([v]) for v in (-2.0, -6.0, -3.0, -4.0))
    h = (-2.0 - -6.0) - (-3.0 - -4.0)  # 3
    beta, e = 0.2, 0.1
    loss, chosen, rejected = preference_losses(pc, pr, rc, rr, beta=beta, loss_type="sigmoid", label_smoothing=e)
    want = -(1 - e) * math.log(1 / (1 + math.exp(-beta * h))) - e * math.log(1 / (1 + math.exp(beta * h)))
    assert math.isclose(float(loss), want, rel_tol=1e-6)
    assert math.isclose(float(chosen), beta * 1.0, rel_tol=1e-6) and math.isclose(float(rejected), beta * -2.0,
                                                                                    rel_tol=1e-6)
    # IPO averages each response's log-ratio per response token (TRL, the IPO authors): chosen has 2
    # tokens, rejected 4, so the margin is 1/2 - -2/4 = 1, not the summed h = 3
    ipo, ipo_chosen, _ = preference_losses(pc, pr, rc, rr, beta=beta, loss_type="ipo",
                                           chosen_tokens=torch.tensor([2.0]), rejected_tokens=torch.tensor([4.0]))
    assert math.isclose(float(ipo), (1.0 - 1 / (2 * beta)) ** 2, rel_tol=1e-6)
    assert math.isclose(float(ipo_chosen), beta * 1.0, rel_tol=1e-6)  # rewards stay summed (TRL's)
    with pytest.raises(ValueError, match="token counts"):
        preference_losses(pc, pr, rc, rr, beta=beta, loss_type="ipo")


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    pairs = [encode({"prompt": f"Q{i}: add {i} and {i}.", "chosen": f"It is {2 * i}.", "rejected": "No."}, tok)
             for i in range(3)]
    return model, tok, PreferenceCollator(tok.pad_token_id)(pairs)


def _by_hand(model, batch) -> torch.Tensor:
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1].float()
    labels = batch["labels"][:, 1:]
    lp = logits.log_softmax(-1).gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (lp * (labels != -100)).sum(1)


@pytest.mark.parametrize("chunk", [None, 5])
def test_sequence_logps_plain_and_chunked_equal_log_softmax_by_hand_with_equal_gradients(tiny, chunk):
    model, _, batch = tiny
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask")}
    want = _by_hand(model, batch)
    model.zero_grad()
    want.sum().backward()
    want_grad = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    got = sequence_logps(model, inputs, batch["labels"], chunk)
    got.sum().backward()
    assert got.shape == (6,) and torch.allclose(got, want, atol=1e-5)
    for n, p in model.named_parameters():
        assert torch.allclose(p.grad, want_grad[n], atol=1e-6), n
    model.zero_grad()


def test_objective_on_a_frozen_copy_is_ln2_counts_pairs_and_reduces_rewards(tiny):
    import copy

    model, _, batch = tiny
    objective = PreferenceObjective(dpo_config(), FrozenReference(copy.deepcopy(model)))
    total = objective(model, batch)
    assert PreferenceObjective.count(batch) == 3
    assert math.isclose(float(total) / 3, math.log(2), rel_tol=1e-6)
    figures = objective.reduce(lambda t: t, torch.device("cpu"))
    assert figures == {"rewards_chosen": 0.0, "rewards_rejected": 0.0, "reward_margin": 0.0, "reward_accuracy": 0.0}
    assert objective.reduce(lambda t: t, torch.device("cpu")) == {}  # reset by the reduction


def test_adapters_off_reference_is_the_base_model_without_gradients(tiny, tiny_model_dir):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    _, _, batch = tiny
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    with torch.no_grad():
        base_lp = _by_hand(base, batch)
    policy = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32),
                            LoraConfig(r=4, target_modules=["q_proj", "v_proj"], lora_dropout=0.0))
    with torch.no_grad():
        for n, p in policy.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)  # a trained adapter: the policy is no longer the base
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask")}
    ref = AdapterOffReference().logps(policy, inputs, batch["labels"], None)
    assert not ref.requires_grad and torch.allclose(ref, base_lp, atol=1e-5)
    adapted = sequence_logps(policy, inputs, batch["labels"])
    assert adapted.requires_grad and not torch.allclose(adapted, base_lp, atol=1e-3)
    # the objective's loss is no longer ln 2, and its gradient reaches the adapter only
    objective = PreferenceObjective(dpo_config(beta=0.1), AdapterOffReference())
    loss = objective(policy, batch)
    assert not math.isclose(float(loss) / 3, math.log(2), rel_tol=1e-4)
    loss.backward()
    assert all((p.grad is not None) == p.requires_grad for p in policy.parameters())


def test_ipo_objective_first_value(tiny):
    import copy

    model, _, batch = tiny
    objective = PreferenceObjective(dpo_config(beta=0.25, loss_type=PreferenceLoss.ipo),
                                    FrozenReference(copy.deepcopy(model)), chunk_tokens=4)
    assert math.isclose(float(objective(model, batch)) / 3, (1 / 0.5) ** 2, rel_tol=1e-6)


def test_ipo_objective_averages_each_responses_log_ratio_per_response_token(tiny):
    """Against log-softmax by hand on responses of unequal length, a policy that is not the reference."""
    import copy

    model, _, batch = tiny
    policy = copy.deepcopy(model)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(torch.randn_like(p) * 0.05)
        pi, ref = _by_hand(policy, batch).double(), _by_hand(model, batch).double()
    tokens = (batch["labels"][:, 1:] != -100).sum(1).double()
    assert tokens[:3].tolist() != tokens[3:].tolist()  # chosen and rejected differ in length
    ratio = (pi - ref) / tokens
    beta = 0.25
    want = ((ratio[:3] - ratio[3:] - 1 / (2 * beta)) ** 2).sum()
    objective = PreferenceObjective(dpo_config(beta=beta, loss_type=PreferenceLoss.ipo),
                                    FrozenReference(copy.deepcopy(model)))
    got = objective(policy, batch)
    assert math.isclose(float(got), float(want), rel_tol=1e-5)
    summed = (((pi - ref)[:3] - (pi - ref)[3:] - 1 / (2 * beta)) ** 2).sum()  # the old form differs
    assert not math.isclose(float(got), float(summed), rel_tol=1e-3)


def test_precomputed_reference_logps_are_the_reference_of_each_pair_and_reach_the_batches(tiny):
    from shardtune.data.preference import attach_reference_logps
    from shardtune.train.dpo import StartingModelReference, precompute_reference_logps

    model, tok, _ = tiny
    samples = [encode({"prompt": f"Q{i}.", "chosen": f"Yes {i}" * (1 + i % 3), "rejected": "No."}, tok)
               for i in range(5)]
    collate = PreferenceCollator(tok.pad_token_id)
    model.train()
    # 2 "ranks" of batch 2: each computes its slices (a filler where it has none) and the sum holds all
    parts = [precompute_reference_logps(model, samples, StartingModelReference(), collate=collate, batch_size=2,
                                        rank=r, world_size=2, device=torch.device("cpu"), all_reduce_sum=lambda t: t)
             for r in range(2)]
    values = parts[0] + parts[1]
    one = collate(samples)
    with torch.no_grad():
        want = sequence_logps(model, {k: one[k] for k in ("input_ids", "attention_mask")}, one["labels"])
    assert torch.allclose(values[:, 0], want[:5].double(), atol=1e-5)
    assert torch.allclose(values[:, 1], want[5:].double(), atol=1e-5)
    assert model.training  # left as it was
    attach_reference_logps(samples, values.tolist())
    batch = collate(samples[:3])
    assert batch["reference_logps"].tolist() == values[:3, 0].tolist() + values[:3, 1].tolist()
    objective = PreferenceObjective(dpo_config(precompute_reference=True), StartingModelReference())
    assert math.isclose(float(objective(model, batch)) / 3, math.log(2), rel_tol=1e-5)
    del batch["reference_logps"]
    with pytest.raises(RuntimeError, match="without the precomputed reference"):
        objective(model, batch)
