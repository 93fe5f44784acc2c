"""Pad slots that ``--batching_strategy packing`` wastes, with the real Llama 3 tokenizer.

Alpaca-style rows (benchmarks.throughput's generator: a short instruction, an input in 40% of
rows, log-normal output lengths) are tokenised as the recipe's ``alpaca_dataset`` does, with the
real Llama 3 tokenizer built from Meta's BPE file (``shardtune.demo.llama3``), truncated to the
context length (``--overlong truncate``, the default) and assigned to chunks of ``L`` tokens by

* ``shardtune``: ``data.packing.assign``, what the recipe does (best fit decreasing: the documents
  longest first, each into the open chunk with the least room that fits it), checked against the
  pad fraction of the recipe's own packing loader for the smallest setting;
* ``best fit in order``: the same in dataset order (shardtune's packer before 2026-12-06);
* ``next fit``: fill one chunk in order, open the next when a document does not fit.

Documents are never split in these three. For comparison, llama-cookbook's ``ConcatDataset``
concatenates every sample and cuts the stream into chunks of ``L`` (documents split across chunks,
no pads) and drops the last partial chunk: its column is the share of tokens dropped.

The waste is pad slots / all slots of the chunks. Printed per number of rows and seed.

    python -m benchmarks.packing_waste                       # 1,000 / 5,000 / 20,000 rows, 3 seeds, ~1 minute
    python -m benchmarks.packing_waste --rows 52002 --seeds 0 # alpaca's size
"""

from __future__ import annotations

import argparse
import bisect
import random
import statistics
import time

from shardtune.data import build_dataloader, pad_fraction
from shardtune.data.alpaca import encode
from shardtune.data.packing import assign
from shardtune.demo.llama3 import build_llama3_tokenizer

from . import common
from .throughput import alpaca_row


def waste(chunks: int, tokens: int, length: int) -> float:
    return 1.0 - tokens / (chunks * length) if chunks else 0.0


def next_fit(lengths: list[int], length: int) -> int:
    chunks, room = 0, 0
    for n in lengths:
        if n > room:
            chunks, room = chunks + 1, length
        room -= n
    return chunks


def best_fit_in_order(lengths: list[int], length: int) -> int:
    room: list[int] = []  # sorted free slots of the open chunks
    for n in lengths:
        j = bisect.bisect_left(room, n)
        free = room.pop(j) if j < len(room) else length
        bisect.insort(room, free - n)
    return len(room)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.packing_waste", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", default="1000,5000,20000", help="comma-separated numbers of rows")
    ap.add_argument("--seeds", default="0,1,2", help="comma-separated data seeds")
    ap.add_argument("--lengths", default="256,1024,4096", help="comma-separated context lengths")
    ap.add_argument("--output_median_words", type=float, default=14,
                    help="median words of an output (14: benchmarks.throughput's rows, ~72 tokens a sample with the "
                         "real tokenizer; 40: ~130, the mean of the real alpaca_data.json)")
    args = ap.parse_args(argv)
    row_counts = [int(x) for x in args.rows.split(",")]
    seeds = [int(x) for x in args.seeds.split(",")]
    context_lengths = [int(x) for x in args.lengths.split(",")]

    start = time.time()
    tokenizer = build_llama3_tokenizer(eos_token="<|end_of_text|>")  # a base model's EOS; 1 token either way
    print(f"tokenizer: real Llama 3 (llama-models BPE), {len(tokenizer)} ids, built in {time.time() - start:.1f} s")
    print("| rows | seed | tokens/sample: mean, median, p90, max | L | truncated | chunks | "
          "shardtune (best fit decreasing) | best fit in order | next fit | cookbook concat: tokens dropped |")
    print("|---:|---:|:--|---:|---:|---:|---:|---:|---:|---:|")
    summary: dict[int, list[float]] = {L: [] for L in context_lengths}
    for seed in seeds:
        rng = random.Random(seed)
        rows = [alpaca_row(rng, args.output_median_words) for _ in range(max(row_counts))]
        samples = [encode(row, tokenizer) for row in rows]
        all_lengths = [len(s["input_ids"]) for s in samples]
        for n_rows in row_counts:
            raw = all_lengths[:n_rows]
            s = sorted(raw)
            stats = f"{statistics.mean(s):.0f}, {statistics.median(s):.0f}, {s[int(0.9 * (len(s) - 1))]}, {s[-1]}"
            for L in context_lengths:
                lengths = [min(n, L) for n in raw]
                tokens = sum(lengths)
                truncated = sum(n > L for n in raw)
                bf = len(assign(lengths, L))
                w = waste(bf, tokens, L)
                if n_rows == min(row_counts) and seed == seeds[0]:  # the recipe's loader agrees
                    kept = [{k: v[:L] for k, v in s.items()} for s in samples[:n_rows]]
                    loader = build_dataloader(kept, tokenizer=tokenizer, strategy="packing", batch_size=1,
                                              context_length=L, shuffle=False, seed=0, drop_last=False)
                    assert abs(pad_fraction(loader) - w) < 1e-9, (pad_fraction(loader), w)
                summary[L].append(w)
                dropped = (sum(raw) % L) / sum(raw)  # ConcatDataset keeps whole chunks only
                print(f"| {n_rows:,} | {seed} | {stats} | {L} | {truncated / n_rows:.1%} | {bf:,} | {w:.1%} | "
                      f"{waste(best_fit_in_order(lengths, L), tokens, L):.1%} | "
                      f"{waste(next_fit(lengths, L), tokens, L):.1%} | {dropped:.2%} |")
    for L, ws in summary.items():
        print(f"L={L}: shardtune's packing wastes {min(ws):.1%}-{max(ws):.1%} of the slots")
    print(f"total {time.time() - start:.0f} s")


if __name__ == "__main__":
    common.entry(main)
