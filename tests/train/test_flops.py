"""The model-FLOPs formula: against torch's FLOP counter, the token statistics it is fed, N."""

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode
from transformers import AutoModelForCausalLM

from shardtune.data.packing import pack
from shardtune.train.flops import (FlopMeasure, ModelShape, batch_token_stats, forward_flops, model_flops,
                                   weight_grad_params)
from shardtune.train.loop import IGNORE_INDEX, StepResult, loss_sum


def _linear_weights(model) -> int:
    return sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))


@pytest.mark.parametrize("fixture", ["tiny_model_dir", "tiny_tied_model_dir"])
def test_n_is_every_matmul_weight_of_the_model(fixture, request):
    model = AutoModelForCausalLM.from_pretrained(request.getfixturevalue(fixture))
    shape = ModelShape.from_config(model.config)
    assert shape.matmul_params == _linear_weights(model)  # q/k/v/o, MLP and the head (tied or not)
    assert weight_grad_params(model, shape) == shape.matmul_params  # a full fine-tune: N_w = N


def test_formula_matches_the_flop_counter_on_a_training_step(tiny_model_dir):
    """Eager attention, whose QKᵀ and AV are bmm ops the counter sees (torch 2.13's counter has no
    entry for the CPU SDPA kernel); full rows, so every slot is a non-pad token."""
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation="eager")
    shape = ModelShape.from_config(model.config)
    ids = torch.randint(4, model.config.vocab_size, (4, 48), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    tokens, squares = batch_token_stats(batch)
    assert (tokens, squares) == (4 * 48, 4 * 48 * 48)
    with FlopCounterMode(display=False) as counter:
        loss_sum(model, batch).backward()
    formula = model_flops(shape, tokens, squares)
    assert formula == pytest.approx(counter.get_total_flops(), rel=0.10)  # the bar
    assert formula == pytest.approx(counter.get_total_flops(), rel=1e-3)  # in fact: the same count
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(input_ids=ids)
    assert forward_flops(shape, tokens, squares) == pytest.approx(counter.get_total_flops(), rel=1e-3)


def test_flop_counter_hook_counts_sdpa_on_cpu_too(tiny_model_dir):
    """--flop_counter's count of a step of the default (SDPA) model: torch's counter has no formula
    for SDPA's CPU kernel, FlopMeasure adds torch's own SDPA formulas for it. Its backward counts
    the attention matrix recomputed (2.5x the forward, the formula 2x): a little above the formula."""
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)  # sdpa
    shape = ModelShape.from_config(model.config)
    ids = torch.randint(4, model.config.vocab_size, (4, 48), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    measure = FlopMeasure(start_step=0, print_fn=lambda *a: None)
    measure.before_step(0)
    loss_sum(model, batch).backward()
    measure.after_step(StepResult(step=1, epoch=0, loss=1.0, label_tokens=1, input_tokens=4 * 48, seconds=0.1, lr=0.1))
    formula = model_flops(shape, 4 * 48, 4 * 48 * 48)
    matmuls = 6 * shape.matmul_params * 4 * 48
    assert measure.flops > matmuls  # the attention is in the count
    assert formula == pytest.approx(measure.flops, rel=0.10)
    assert measure.record()["flops_per_rank"] == measure.flops


def test_frozen_weights_get_no_weight_gradient_flops(tiny_model_dir):
    from peft import LoraConfig, get_peft_model

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation="eager")
    model = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    shape = ModelShape.from_config(model.config)
    lora = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
    assert weight_grad_params(model, shape) == lora
    full, peft = model_flops(shape, 100, 1000), model_flops(shape, 100, 1000, weight_grad_params=lora)
    assert peft == pytest.approx(full - 2 * (shape.matmul_params - lora) * 100)


def test_the_counter_hook_compares_its_count_with_the_formula(logged_run):
    """--flop_counter in the recipe: its exact count and the formula's figure for the same step."""
    counted = logged_run.metrics["flop_counter"]
    assert counted["step"] == 2 and counted["flops_per_rank"] > 0  # after 1 step of warm-up
    assert counted["formula_flops_per_rank"] == pytest.approx(counted["flops_per_rank"], rel=0.10)
    assert "FLOP counter (step 2)" in logged_run.printed and "the model-FLOPs formula" in logged_run.printed


def test_padded_rows_count_their_mask():
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]])
    assert batch_token_stats({"input_ids": torch.zeros(2, 4, dtype=torch.long), "attention_mask": mask}) == (7, 9 + 16)


def test_packed_rows_count_documents_and_not_the_pad_tail():
    """The real packer's output: documents of 3, 5 and 2 tokens in rows of 8."""
    docs = [{"input_ids": list(range(10, 10 + n)), "labels": [IGNORE_INDEX] + list(range(11, 10 + n))}
            for n in (3, 5, 2)]
    chunks, pads = pack(docs, 8, pad_id=0)
    batch = {k: torch.tensor([c[k] for c in chunks]) for k in ("input_ids", "labels", "position_ids")}
    assert sum(pads) == 2 * 8 - 10
    assert batch_token_stats(batch) == (10, 9 + 25 + 4)
    # a row filled to the end by one document has no tail to drop
    full = {"input_ids": torch.arange(1, 9)[None], "labels": torch.arange(1, 9)[None],
            "position_ids": torch.arange(8)[None]}
    assert batch_token_stats(full) == (8, 64)
