"""The chunked loss (train/loss.py) gives the plain loss's sum and gradients: plain and tied heads,
a LoRA on the head, peft's modules_to_save copy of it, Llama 3.2 Vision, bf16 autocast, every
chunk size, and a batch without label tokens. (Under FSDP on 2 ranks: tests/parallel/test_fsdp_speed.py.)"""

from __future__ import annotations

import warnings

import pytest
import torch
from transformers import AutoModelForCausalLM

from shardtune.train.loop import IGNORE_INDEX, loss_sum


def text_batch(vocab: int, seed: int = 0) -> dict:
    """3 rows of 20 tokens, a masked "prompt", one row right-padded."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, vocab, (3, 20), generator=g)
    mask = torch.ones_like(ids)
    mask[2, 15:] = 0
    labels = ids.clone()
    labels[:, :5] = IGNORE_INDEX
    labels[mask == 0] = IGNORE_INDEX
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def loss_and_grads(model, batch, chunk_tokens=None, autocast=None):
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=autocast or torch.bfloat16, enabled=autocast is not None):
        value = loss_sum(model, batch, chunk_tokens=chunk_tokens)
    value.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return value.detach(), grads


def assert_same(model, batch, chunk_tokens, rtol=1e-5, atol=1e-5, autocast=None):
    plain, plain_grads = loss_and_grads(model, batch, autocast=autocast)
    chunked, chunked_grads = loss_and_grads(model, batch, chunk_tokens, autocast=autocast)
    assert chunked.dtype == plain.dtype == torch.float32
    torch.testing.assert_close(chunked, plain, rtol=rtol, atol=0)
    assert chunked_grads.keys() == plain_grads.keys() and plain_grads
    for name, grad in plain_grads.items():
        torch.testing.assert_close(chunked_grads[name], grad, rtol=rtol, atol=atol,
                                   msg=lambda m, name=name: f"{name}: {m}")
    return plain_grads


@pytest.fixture(scope="module")
def llama(tiny_model_dir):
    return AutoModelForCausalLM.from_pretrained(tiny_model_dir)


@pytest.mark.parametrize("chunk_tokens", [1, 7, 1024])
def test_chunked_equals_plain_loss_and_gradients(llama, chunk_tokens):
    grads = assert_same(llama, text_batch(llama.config.vocab_size), chunk_tokens)
    assert "lm_head.weight" in grads and "model.embed_tokens.weight" in grads


def test_chunked_with_tied_embeddings(tiny_tied_model_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_tied_model_dir)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert_same(model, text_batch(model.config.vocab_size), 8)


@pytest.mark.parametrize("lora", [dict(target_modules=["q_proj", "v_proj", "lm_head"]),
                                  dict(target_modules=["q_proj"], modules_to_save=["lm_head"])],
                         ids=["lora_on_head", "modules_to_save_head"])
def test_chunked_goes_through_peft_wrapped_head(tiny_model_dir, lora):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    # init_lora_weights=False: B is random, so the head's LoRA changes the logits and gets gradients
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                           LoraConfig(r=4, lora_dropout=0.0, init_lora_weights=False, **lora))
    grads = assert_same(model, text_batch(model.config.vocab_size), 8)
    assert any("lm_head" in n for n in grads), sorted(grads)


def test_chunked_under_bf16_autocast(llama):
    """The head computes in bf16 in both; the chunked sum adds the same per-token losses in
    another order, so the comparison is at bf16's resolution."""
    assert_same(llama, text_batch(llama.config.vocab_size), 8, rtol=2e-2, atol=2e-2, autocast=torch.bfloat16)


def test_chunked_on_llama_vision(tiny_vision_model_dir):
    from transformers import MllamaForConditionalGeneration

    from shardtune.model.probes import probe_inputs

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = MllamaForConditionalGeneration.from_pretrained(tiny_vision_model_dir)
    batch = {k: v.repeat(2, *([1] * (v.dim() - 1))) for k, v in probe_inputs(model, tokens=20).items()}
    batch["labels"] = batch["input_ids"].clone()
    batch["labels"][:, :3] = IGNORE_INDEX
    grads = assert_same(model, batch, 8)
    assert any("vision_model" in n for n in grads) and "lm_head.weight" in grads


def test_batch_without_label_tokens_still_reaches_every_weight(llama):
    """0 loss and zero (not missing) gradients, as the plain loss gives: FSDP ranks must reduce
    the same gradients whatever their batches hold."""
    batch = text_batch(llama.config.vocab_size)
    batch["labels"] = torch.full_like(batch["labels"], IGNORE_INDEX)
    grads = assert_same(llama, batch, 8)
    assert len(grads) == len(list(llama.parameters()))
    assert all(float(g.abs().max()) == 0.0 for g in grads.values())


def test_recipe_trains_the_same_with_either_loss(tiny_model_dir, tmp_path):
    import json

    from shardtune.finetuning import main as finetune

    data = tmp_path / "rows.json"
    data.write_text(json.dumps([{"instruction": f"Add {i} and {i + 1}.", "input": "",
                                 "output": f"The answer is {2 * i + 1}."} for i in range(24)]))
    common = ["--model_name", str(tiny_model_dir), "--dataset", "alpaca_dataset", "--alpaca_dataset.data_path",
              str(data), "--output_dir", str(tmp_path / "out"), "--save_model", "False", "--num_epochs", "1",
              "--max_train_step", "3", "--lr", "1e-3", "--device", "cpu", "--batch_size_training", "4",
              "--batching_strategy", "padding"]
    plain = finetune([*common, "--loss", "plain"])
    chunked = finetune([*common, "--loss", "chunked", "--loss_chunk_tokens", "16"])
    assert len(plain["train_step_loss"]) == 3
    assert chunked["train_step_loss"] == pytest.approx(plain["train_step_loss"], rel=1e-5)
    assert chunked["best_eval_loss"] == pytest.approx(plain["best_eval_loss"], rel=1e-5)


def _masks_seen(model, batch, chunk_tokens) -> tuple[list, torch.Tensor, dict]:
    seen = []
    handle = model.register_forward_pre_hook(lambda m, args, kwargs: seen.append(kwargs.get("attention_mask")),
                                              with_kwargs=True)
    try:
        value, grads = loss_and_grads(model, batch, chunk_tokens)
    finally:
        handle.remove()
    return seen, value, grads


@pytest.mark.parametrize("chunk_tokens", [None, 7])
def test_causal_padding_runs_without_the_mask_and_gives_the_same_loss_and_gradients(llama, chunk_tokens):
    """Right-padded rows whose pads carry no label (PaddingCollator's CAUSAL_PADDING) need only the
    causal mask: the model gets no attention mask, and the loss and gradients are the masked run's."""
    masked = text_batch(llama.config.vocab_size)
    seen, reference, reference_grads = _masks_seen(llama, {**masked, "causal_padding": False}, chunk_tokens)
    assert seen[0] is not None  # not marked: the mask is passed
    seen, value, grads = _masks_seen(llama, {**masked, "causal_padding": True}, chunk_tokens)
    assert seen == [None]
    torch.testing.assert_close(value, reference, rtol=1e-5, atol=0)
    for name, grad in reference_grads.items():
        torch.testing.assert_close(grads[name], grad, rtol=1e-5, atol=1e-6, msg=lambda m, name=name: f"{name}: {m}")


def test_padding_collator_marks_causal_padding_only_when_every_token_is_attended():
    from shardtune.data.collate import PaddingCollator

    collate = PaddingCollator(pad_id=0)
    rows = [{"input_ids": [5, 6, 7], "labels": [5, 6, 7]}, {"input_ids": [8], "labels": [8]}]
    assert collate(rows)["causal_padding"] is True
    rows[0]["attention_mask"] = [1, 0, 1]  # a sample hiding one of its own tokens: the mask must stay
    assert collate(rows)["causal_padding"] is False
