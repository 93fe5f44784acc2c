"""Padding and packing loaders: shapes, masks, sampler order, rank slices, fillers, pad fraction."""

from __future__ import annotations

import random

import pytest
import torch

from shardtune.config import BatchingStrategy, ShardtuneError
from shardtune.data import build_dataloader, pad_fraction

IGNORE = -100


def make_samples(lengths, vocab=200, seed=0, prompt=2):
    """Synthetic tokenised samples; token 5+i first so each sample is recognisable."""
    rng = random.Random(seed)
    out = []
    for i, n in enumerate(lengths):
        ids = [1] + [rng.randrange(5, vocab) for _ in range(n - 1)]
        labels = [IGNORE] * min(prompt, n) + ids[prompt:]
        out.append({"input_ids": ids, "labels": labels, "attention_mask": [1] * n, "uid": i})
    return out


def loader(samples, tok, strategy="padding", **kw):
    args = dict(tokenizer=tok, strategy=BatchingStrategy(strategy), batch_size=4, context_length=64,
                shuffle=False, seed=0)
    args.update(kw)
    return build_dataloader(samples, **args)


def mixed_lengths(n=37, seed=1):
    rng = random.Random(seed)
    return [rng.randrange(3, 60) for _ in range(n)]


# --- padding ---

def test_padding_pads_to_longest_with_masked_labels(tiny_tokenizer):
    samples = make_samples(mixed_lengths())
    dl = loader(samples, tiny_tokenizer, shuffle=True)
    for indices, batch in zip(dl.batch_sampler, dl):
        rows = [samples[i] for i in indices]
        width = max(len(r["input_ids"]) for r in rows)
        assert set(batch) == {"input_ids", "labels", "attention_mask", "causal_padding"}
        assert batch["causal_padding"] is True  # every sample attends to all its tokens
        assert batch["input_ids"].shape == (len(rows), width) and batch["input_ids"].dtype == torch.long
        for j, r in enumerate(rows):
            n = len(r["input_ids"])
            assert batch["input_ids"][j, :n].tolist() == r["input_ids"]
            assert batch["labels"][j, :n].tolist() == r["labels"]
            assert batch["attention_mask"][j].tolist() == [1] * n + [0] * (width - n)
            assert (batch["input_ids"][j, n:] == tiny_tokenizer.pad_token_id).all()
            assert (batch["labels"][j, n:] == IGNORE).all()


def test_padding_groups_by_length_and_reshuffles_per_epoch(tiny_tokenizer):
    samples = make_samples(mixed_lengths(n=40))
    lengths = [len(s["input_ids"]) for s in samples]
    dl = loader(samples, tiny_tokenizer, shuffle=True, batch_size=4)
    orders = []
    for epoch in (0, 1, 0):
        dl.batch_sampler.set_epoch(epoch)
        batches = list(dl.batch_sampler)
        ranges = sorted((min(lengths[i] for i in b), max(lengths[i] for i in b)) for b in batches)
        assert all(hi <= next_lo for (_, hi), (next_lo, _) in zip(ranges, ranges[1:]))  # groups don't overlap
        orders.append(batches)
    assert orders[0] != orders[1] and orders[0] == orders[2]  # new order per epoch, deterministic
    fixed = loader(samples, tiny_tokenizer, shuffle=False, batch_size=4)
    first = list(fixed.batch_sampler)
    fixed.batch_sampler.set_epoch(3)
    assert list(fixed.batch_sampler) == first  # no shuffle: same order every epoch, short to long
    assert [lengths[b[0]] for b in first] == sorted(lengths[b[0]] for b in first)


@pytest.mark.parametrize("strategy", ["padding", "packing"])
@pytest.mark.parametrize("drop_last", [True, False])
def test_rank_slices_partition_the_global_batch(tiny_tokenizer, strategy, drop_last):
    samples = make_samples(mixed_lengths(n=45, seed=3))
    kw = dict(strategy=strategy, shuffle=True, seed=7, drop_last=drop_last, context_length=64)
    single = loader(samples, tiny_tokenizer, batch_size=4, world_size=1, **kw)
    ranks = [loader(samples, tiny_tokenizer, batch_size=2, rank=r, world_size=2, **kw) for r in (0, 1)]
    for epoch in (0, 1):
        for dl in [single, *ranks]:
            dl.batch_sampler.set_epoch(epoch)
        assert len(ranks[0]) == len(ranks[1]) == len(single)
        for whole, b0, b1 in zip(single, *ranks):
            real = [b for b in (b0, b1) if (b["labels"] != IGNORE).any()]  # fillers have no labels
            for key in ("input_ids", "labels"):
                width = whole[key].shape[1]
                parts = [torch.nn.functional.pad(b[key], (0, width - b[key].shape[1]),
                                                 value=IGNORE if key == "labels" else tiny_tokenizer.pad_token_id)
                         for b in real]
                assert torch.equal(torch.cat(parts), whole[key])


def test_drop_last_false_gives_equal_batch_counts_with_zero_label_filler(tiny_tokenizer):
    samples = make_samples(mixed_lengths(n=9))  # global batch 3 x 2 = 6: the last has 3 samples
    per_rank = [list(loader(samples, tiny_tokenizer, batch_size=2, rank=r, world_size=3,
                            drop_last=False)) for r in range(3)]
    assert [len(b) for b in per_rank] == [2, 2, 2]
    last = [b[-1] for b in per_rank]
    assert [x["input_ids"].shape[0] for x in last] == [2, 1, 1]
    assert (last[2]["labels"] == IGNORE).all() and last[2]["attention_mask"].sum() > 0  # filler
    labelled = sum(int((b["labels"] != IGNORE).sum()) for batches in per_rank for b in batches)
    assert labelled == sum(sum(v != IGNORE for v in s["labels"]) for s in samples)
    dropped = [list(loader(samples, tiny_tokenizer, batch_size=2, rank=r, world_size=3)) for r in range(3)]
    assert [len(b) for b in dropped] == [1, 1, 1]


# --- packing ---

def _documents(chunk):
    """Split a packed chunk into documents at every position-id reset."""
    pos = chunk["position_ids"].tolist()
    starts = [i for i, p in enumerate(pos) if p == 0] + [len(pos)]
    return [(a, b) for a, b in zip(starts, starts[1:])]


def test_packing_chunks_keep_documents_whole(tiny_tokenizer):
    samples = make_samples(mixed_lengths(n=30, seed=5))
    index = {tuple(s["input_ids"]): i for i, s in enumerate(samples)}
    dl = loader(samples, tiny_tokenizer, strategy="packing", batch_size=1, drop_last=False)
    seen = []
    for batch in dl:
        assert set(batch) == {"input_ids", "labels", "position_ids"}  # no attention_mask
        chunk = {k: v[0] for k, v in batch.items()}
        assert chunk["input_ids"].shape == (64,)
        in_chunk = []
        for a, b in _documents(chunk):
            ids, labels = chunk["input_ids"][a:b].tolist(), chunk["labels"][a:b].tolist()
            assert chunk["position_ids"][a:b].tolist() == list(range(b - a))
            assert labels[0] == IGNORE  # no predicting across a document boundary
            if ids[0] != 1:  # the pad tail (documents start with BOS): pads, no labels, at the end
                assert set(ids) == {tiny_tokenizer.pad_token_id} and set(labels) == {IGNORE} and b == 64
                continue
            i = index[tuple(ids)]  # a whole document, never split
            assert labels == [IGNORE] + samples[i]["labels"][1:]
            in_chunk.append(i)
        assert in_chunk == sorted(in_chunk)  # dataset order inside a chunk
        seen += in_chunk
    assert sorted(seen) == list(range(len(samples)))  # every document exactly once


def test_packing_shuffles_chunks_per_epoch(tiny_tokenizer):
    samples = make_samples(mixed_lengths(n=60, seed=2))
    dl = loader(samples, tiny_tokenizer, strategy="packing", batch_size=2, shuffle=True, drop_last=False)
    first = list(dl.batch_sampler)
    dl.batch_sampler.set_epoch(1)
    second = list(dl.batch_sampler)
    assert first != second and sorted(sum(first, [])) == sorted(sum(second, []))


def test_packing_rejects_overlong_samples(tiny_tokenizer):
    with pytest.raises(ShardtuneError, match="more than --context_length 64"):
        loader(make_samples([65]), tiny_tokenizer, strategy="packing")


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_attention_does_not_cross_documents(tiny_model_dir, tiny_tokenizer, attn):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32,
                                                 attn_implementation=attn).eval()
    samples = make_samples([20, 7, 30, 1, 12, 40, 9], vocab=len(tiny_tokenizer))
    dl = loader(samples, tiny_tokenizer, strategy="packing", batch_size=2, context_length=64, drop_last=False)
    checked = 0
    with torch.no_grad():
        for batch in dl:
            # use_cache=False: transformers only derives the packed mask without a KV cache
            logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"],
                           use_cache=False).logits
            for row in range(batch["input_ids"].shape[0]):
                chunk = {k: v[row] for k, v in batch.items()}
                for a, b in _documents(chunk):
                    alone = model(input_ids=chunk["input_ids"][None, a:b], use_cache=False).logits[0]
                    torch.testing.assert_close(logits[row, a:b], alone, atol=1e-5, rtol=0)
                    checked += 1
            # sensitivity check: the same chunk without position resets does attend across documents
            plain = model(input_ids=batch["input_ids"][:1], use_cache=False).logits[0]
            (a, b) = _documents({k: v[0] for k, v in batch.items()})[1]
            assert not torch.allclose(plain[a:b], logits[0, a:b], atol=1e-4)
    assert checked >= len(samples)


# --- pad fraction ---

def test_pad_fraction_lower_for_packing_on_mixed_lengths(tiny_tokenizer):
    rng = random.Random(0)
    samples = make_samples([rng.randrange(2, 65) for _ in range(400)])
    padded = loader(samples, tiny_tokenizer, strategy="padding", batch_size=8, shuffle=True)
    packed = loader(samples, tiny_tokenizer, strategy="packing", batch_size=2, context_length=256)
    fp, fk = pad_fraction(padded), pad_fraction(packed)
    assert 0 <= fk < fp / 2 and fp < 0.2
    # the index-based count equals the count from the batches themselves
    slots = sum(b["attention_mask"].numel() for b in padded)
    pads = sum(int((b["attention_mask"] == 0).sum()) for b in padded)
    assert fp == pytest.approx(pads / slots)
    pack_pads = sum(int(((b["labels"] == IGNORE) & (b["input_ids"] == tiny_tokenizer.pad_token_id)).sum())
                    for b in packed)
    assert fk == pytest.approx(pack_pads / sum(b["input_ids"].numel() for b in packed))


def test_start_batch_resumes_mid_epoch_and_workers_match(tiny_tokenizer):
    samples = make_samples(mixed_lengths(n=24))
    dl = loader(samples, tiny_tokenizer, shuffle=True, batch_size=2)
    dl.batch_sampler.set_epoch(2)
    full = list(dl.batch_sampler)
    dl.batch_sampler.set_epoch(2, start_batch=5)
    assert len(dl) == len(full) - 5 and list(dl.batch_sampler) == full[5:]
    dl.batch_sampler.set_epoch(2)
    in_process = list(dl)
    workers = loader(samples, tiny_tokenizer, shuffle=True, batch_size=2, num_workers=1)
    workers.batch_sampler.set_epoch(2)
    assert all(torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(in_process, workers))


# --- packed batches for flash-attn (no mask reaches it: cumulative lengths instead) ---

def test_packed_varlen_inputs_mark_every_document_of_the_flattened_batch(tiny_tokenizer):
    samples = make_samples([20, 7, 30, 1, 12, 40, 9])
    plain = next(iter(loader(samples, tiny_tokenizer, strategy="packing", batch_size=2, drop_last=False)))
    assert "cu_seq_lens_q" not in plain  # SDPA / eager: transformers masks from position_ids
    dl = loader(samples, tiny_tokenizer, strategy="packing", batch_size=2, drop_last=False, packed_varlen=True)
    for batch in dl:
        rows, width = batch["input_ids"].shape
        starts = [r * width + a for r in range(rows) for a, _ in _documents({k: batch[k][r] for k in ("position_ids",)})]
        cu = batch["cu_seq_lens_q"]
        assert cu.dtype == torch.int32 and cu.tolist() == starts + [rows * width]
        assert torch.equal(batch["cu_seq_lens_k"], cu)
        assert batch["max_length_q"] == batch["max_length_k"] == int(cu.diff().max())


def _varlen_reference_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """A flash-attn stand-in for CPU: no mask; with cu_seq_lens it attends within each segment of the
    flattened batch (as flash_attn_varlen_func does), without them causally over each whole row."""
    from transformers.integrations.sdpa_attention import repeat_kv

    b, h, n, d = query.shape
    key, value = repeat_kv(key, h // key.shape[1]), repeat_kv(value, h // value.shape[1])
    cu = kwargs.get("cu_seq_lens_q")
    _varlen_reference_attention.calls.append(cu is not None)
    if cu is None:
        out = torch.nn.functional.scaled_dot_product_attention(query, key, value, is_causal=True, scale=scaling)
        return out.transpose(1, 2).contiguous(), None
    q, k, v = (t.transpose(1, 2).reshape(b * n, h, d) for t in (query, key, value))
    out = torch.empty_like(q)
    for a, e in zip(cu.tolist(), cu.tolist()[1:]):
        seg = [t[a:e].transpose(0, 1)[None] for t in (q, k, v)]
        out[a:e] = torch.nn.functional.scaled_dot_product_attention(*seg, is_causal=True, scale=scaling)[0].transpose(0, 1)
    return out.reshape(b, n, h, d), None


_varlen_reference_attention.calls = []


def test_packed_batch_with_varlen_inputs_attends_per_document_without_a_mask(tiny_model_dir, tiny_tokenizer):
    """The inputs a flash model gets reach its attention layers and keep documents apart, with a
    batch of several rows (transformers alone only finds document starts in a batch of one)."""
    from transformers import AttentionInterface, AttentionMaskInterface, AutoModelForCausalLM
    from transformers.masking_utils import flash_attention_mask

    AttentionInterface.register("shardtune_test_varlen", _varlen_reference_attention)
    AttentionMaskInterface.register("shardtune_test_varlen", flash_attention_mask)  # no mask, as for flash
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32,
                                                 attn_implementation="shardtune_test_varlen").eval()
    reference = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    samples = make_samples([20, 7, 30, 1, 12, 40, 9], vocab=len(tiny_tokenizer))
    batch = next(iter(loader(samples, tiny_tokenizer, strategy="packing", batch_size=2, context_length=64,
                             drop_last=False, packed_varlen=True)))
    from shardtune.train.loop import _MODEL_INPUTS

    inputs = {k: v for k, v in batch.items() if k in _MODEL_INPUTS}
    with torch.no_grad():
        _varlen_reference_attention.calls.clear()
        logits = model(**inputs, use_cache=False).logits
        assert _varlen_reference_attention.calls and all(_varlen_reference_attention.calls)
        without = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits
        checked = 0
        for row in range(batch["input_ids"].shape[0]):
            chunk = {k: batch[k][row] for k in ("input_ids", "position_ids")}
            for a, b in _documents(chunk):
                alone = reference(input_ids=chunk["input_ids"][None, a:b], use_cache=False).logits[0]
                torch.testing.assert_close(logits[row, a:b], alone, atol=1e-5, rtol=0)
                checked += 1
        # what flash did before the fix: position_ids alone, batch of 2 -> attends across documents
        (a, b) = _documents({"position_ids": batch["position_ids"][0]})[1]
        assert not torch.allclose(without[0, a:b], logits[0, a:b], atol=1e-4)
    assert checked >= 3


def test_packing_places_the_longest_documents_first():
    """Best fit decreasing: 2+5+4+3+2 tokens fill two chunks of 8 exactly (in dataset order, best
    fit needs three: 2+5 | 4+3 | 2); each chunk keeps its documents in dataset order."""
    from shardtune.data.packing import assign

    assert assign([2, 5, 4, 3, 2], 8) == [[1, 3], [0, 2, 4]]
    assert assign([4, 0, 4], 4) == [[0], [2]]  # ties keep dataset order; empty documents take no room


@pytest.mark.parametrize("strategy", ["packing", "padding"])
def test_no_full_batch_counts_what_the_batches_are_made_of(tiny_tokenizer, make_config, strategy):
    """38 short samples pack into one 512-token sequence: the error counts the packed sequences
    (a global batch of 4 x 2 needs 8), not the 38 samples, which would read as enough."""
    from shardtune.data.split import DataReport, TokenizedSplit
    from shardtune.data.training import build_train_loader

    cfg = make_config("alpaca_dataset", batching_strategy=BatchingStrategy(strategy),
                      batch_size_training=4 if strategy == "packing" else 32, num_workers_dataloader=0)
    split = TokenizedSplit(make_samples([12] * 38), DataReport("rows", "train", 512))
    with pytest.raises(ShardtuneError) as err:
        build_train_loader(cfg, split, tiny_tokenizer, rank=0, world_size=2)
    if strategy == "packing":
        assert "38 samples packed into 1 sequence of --context_length 512 tokens" in str(err.value)
        assert "needs 8" in str(err.value) and "--batching_strategy padding" in str(err.value)
    else:
        assert "38 samples, and a global batch of 32 x 2 ranks needs 64" in str(err.value)
