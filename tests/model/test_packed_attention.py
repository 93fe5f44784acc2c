"""Per-document SDPA for packed batches (model/packed_attention.py): the same logits and gradients
as transformers' masked SDPA, no attention across documents, exactly SDPA for other batches."""

from __future__ import annotations

import json
import random

import pytest
import torch

from shardtune.data import build_dataloader
from shardtune.model.packed_attention import BUCKET, PACKED_SDPA, group_documents, register_packed_attention
from shardtune.train.loop import _MODEL_INPUTS


def _model(path, attn, dtype=torch.float32):
    from transformers import AutoModelForCausalLM

    register_packed_attention()
    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation=attn)


def _packed_batch(tokenizer, lengths, context_length=160, batch_size=5, seed=0):
    """The first batch of the packing loader: with 5 rows of 160, every document of ``lengths``."""
    rng = random.Random(seed)
    samples = [{"input_ids": [rng.randrange(4, len(tokenizer)) for _ in range(n)]} for n in lengths]
    for s in samples:
        s["labels"] = list(s["input_ids"])
        s["attention_mask"] = [1] * len(s["input_ids"])
    dl = build_dataloader(samples, tokenizer=tokenizer, strategy="packing", batch_size=batch_size,
                          context_length=context_length, shuffle=False, seed=0, drop_last=False,
                          packed_varlen=True)
    return next(iter(dl))


def documents(position_ids: torch.Tensor) -> list[tuple[int, int]]:
    """(start, end) of each document of a packed row: positions restart at 0."""
    starts = (position_ids == 0).nonzero().flatten().tolist() + [position_ids.numel()]
    return list(zip(starts, starts[1:]))


LENGTHS = [70, 5, 64, 65, 1, 130, 22, 40, 150, 9, 33, 128]  # bucket edges: 64, 65, 128, 130


def test_groups_cover_every_token_once_in_buckets_of_whole_documents():
    bounds = (0, 70, 75, 139, 204, 205, 205, 335)  # one empty document
    g = group_documents(bounds)
    assert [size for _, size in g.shapes] == sorted({64, 128, 192})
    assert all(size % BUCKET == 0 for _, size in g.shapes)
    assert sum(docs for docs, _ in g.shapes) == 6  # the empty document has no group slot
    assert sum(docs * size for docs, size in g.shapes) == g.gather.numel()
    # every token's output slot reads that same token
    assert torch.equal(g.gather[g.scatter], torch.arange(bounds[-1]))
    assert len(set(g.scatter.tolist())) == bounds[-1]
    # a slot past a document's end reads that document's own first token
    offset = 0
    for docs, size in g.shapes:
        rows = g.gather[offset:offset + docs * size].view(docs, size)
        for row in rows:
            start = int(row[0])
            assert start in bounds and torch.all((row >= start) & (row < start + size))
        offset += docs * size


def test_logits_and_gradients_equal_masked_sdpa(tiny_model_dir, tiny_tokenizer):
    """GQA model (4 heads, 2 KV heads), documents on and off the bucket edges."""
    batch = _packed_batch(tiny_tokenizer, LENGTHS)
    inputs = {k: v for k, v in batch.items() if k in _MODEL_INPUTS}
    assert "cu_seq_lens_q" in inputs and batch["input_ids"].shape[0] > 1
    # float64: the two paths compute the same sums in different orders, and fp32 rounding of the
    # large embedding gradients (~1e3) reaches 3e-4 in both (against float64), over any tolerance
    masked = _model(tiny_model_dir, "sdpa", torch.float64)
    packed = _model(tiny_model_dir, PACKED_SDPA, torch.float64)
    assert packed.config.num_key_value_heads < packed.config.num_attention_heads
    group_documents.cache_clear()
    out = {}
    for name, model, kw in (("masked", masked, {"input_ids": batch["input_ids"],
                                                "position_ids": batch["position_ids"]}),
                            ("packed", packed, inputs)):
        logits = model(**kw, use_cache=False).logits
        (logits * torch.linspace(-1, 1, logits.shape[-1], dtype=logits.dtype)).sum().backward()
        out[name] = logits.detach(), {n: p.grad for n, p in model.named_parameters()}
    assert group_documents.cache_info().currsize == 1  # the per-document path ran, planned once
    torch.testing.assert_close(out["packed"][0], out["masked"][0], atol=2e-5, rtol=0)
    for n, grad in out["masked"][1].items():
        torch.testing.assert_close(out["packed"][1][n], grad, atol=2e-5, rtol=1e-4, msg=n)


def test_packed_documents_equal_each_document_alone(tiny_model_dir, tiny_tokenizer):
    batch = _packed_batch(tiny_tokenizer, LENGTHS)
    inputs = {k: v for k, v in batch.items() if k in _MODEL_INPUTS}
    packed, reference = _model(tiny_model_dir, PACKED_SDPA).eval(), _model(tiny_model_dir, "sdpa").eval()
    with torch.no_grad():
        logits = packed(**inputs, use_cache=False).logits
        checked = 0
        for row in range(batch["input_ids"].shape[0]):
            for a, b in documents(batch["position_ids"][row]):
                alone = reference(input_ids=batch["input_ids"][row, None, a:b], use_cache=False).logits[0]
                torch.testing.assert_close(logits[row, a:b], alone, atol=1e-5, rtol=0)
                checked += 1
        # sensitivity: the same rows attended causally across documents differ
        whole = reference(input_ids=batch["input_ids"], use_cache=False).logits
        (a, b) = documents(batch["position_ids"][0])[1]
        assert not torch.allclose(whole[0, a:b], logits[0, a:b], atol=1e-4)
    assert checked >= len(LENGTHS)


def test_bf16_matches_masked_sdpa_within_bf16_rounding(tiny_model_dir, tiny_tokenizer):
    batch = _packed_batch(tiny_tokenizer, LENGTHS)
    inputs = {k: v for k, v in batch.items() if k in _MODEL_INPUTS}
    with torch.no_grad():
        masked = _model(tiny_model_dir, "sdpa", torch.bfloat16)(
            input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits
        packed = _model(tiny_model_dir, PACKED_SDPA, torch.bfloat16)(**inputs, use_cache=False).logits
    assert packed.dtype == torch.bfloat16
    torch.testing.assert_close(packed.float(), masked.float(), atol=3e-2, rtol=2e-2)


def test_batches_without_document_lengths_are_exactly_sdpa(tiny_model_dir, tiny_tokenizer):
    """Padded batches (validation, a padding run) and generation take transformers' SDPA path."""
    ids = torch.randint(4, len(tiny_tokenizer), (3, 20))
    mask = torch.ones_like(ids)
    mask[1, 12:] = 0
    mask[2, :5] = 0  # left padding, as generation pads
    sdpa, packed = _model(tiny_model_dir, "sdpa").eval(), _model(tiny_model_dir, PACKED_SDPA).eval()
    with torch.no_grad():
        assert torch.equal(packed(input_ids=ids, attention_mask=mask).logits,
                           sdpa(input_ids=ids, attention_mask=mask).logits)
        gen = dict(max_new_tokens=4, do_sample=False, pad_token_id=tiny_tokenizer.pad_token_id)
        assert torch.equal(packed.generate(input_ids=ids, attention_mask=mask, **gen),
                           sdpa.generate(input_ids=ids, attention_mask=mask, **gen))


def test_document_lengths_that_do_not_cover_the_batch_are_refused(tiny_model_dir, tiny_tokenizer):
    batch = _packed_batch(tiny_tokenizer, LENGTHS)
    inputs = {k: v for k, v in batch.items() if k in _MODEL_INPUTS}
    inputs["cu_seq_lens_q"] = inputs["cu_seq_lens_q"][:-1]  # one row's worth short
    with pytest.raises(ValueError, match="document lengths cover"):
        _model(tiny_model_dir, PACKED_SDPA)(**inputs, use_cache=False)


def test_saved_model_config_does_not_name_the_kernel(tiny_model_dir, tmp_path):
    """A model trained with it loads anywhere: the kernel is a runtime choice, not in config.json."""
    _model(tiny_model_dir, PACKED_SDPA).save_pretrained(tmp_path)
    assert PACKED_SDPA not in (tmp_path / "config.json").read_text()
    assert "attn_implementation" not in json.loads((tmp_path / "config.json").read_text())
