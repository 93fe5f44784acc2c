"""Packed attention: transformers' masked SDPA against shardtune's per-document SDPA, by row length.

Each setting packs documents of log-normal lengths (median ~``--median`` tokens, like the peer
benchmark's short setting) into rows of ``L`` tokens, ``--tokens`` tokens in all (``rows x L``), and
times one forward + backward of a random-initialised Llama (the peer benchmark's ``small`` shape:
hidden 512, 8 layers, 8/4 heads, intermediate 1376, vocab 8192; fp32) with

* ``sdpa``: the ``position_ids`` only; transformers builds the block-diagonal mask and SDPA's masked
  kernel computes every score of each row (HF Trainer's and TRL's packed path on this model);
* ``shardtune_packed_sdpa``: the same batch with the documents' cumulative lengths, as the recipe's
  packing collator sends them (``shardtune.model.packed_attention``).

It prints the median of ``--repeats`` timed steps after a warm-up step, the speed-up, and the
largest logits difference between the two (the same model, so ~1e-5 in fp32).

    python -m benchmarks.packed_attention                       # rows of 512, 2048 and 4096, ~3 minutes
    python -m benchmarks.packed_attention --row_lengths 1024 --threads 1
"""

from __future__ import annotations

import argparse
import random
import statistics
import time

import torch

from . import common


def rows_of_documents(rng: random.Random, rows: int, length: int, median: float) -> torch.Tensor:
    """``position_ids`` [rows, length]: documents packed back to back, positions restarting at 0."""
    out = []
    for _ in range(rows):
        positions, used = [], 0
        while used < length:
            n = min(length - used, max(14, int(rng.lognormvariate(0, 0.6) * median)))
            positions += range(n)
            used += n
        out.append(torch.tensor(positions))
    return torch.stack(out)


def main(argv=None) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    from shardtune.data.packing import varlen_lengths
    from shardtune.model.packed_attention import PACKED_SDPA, register_packed_attention

    p = argparse.ArgumentParser(prog="python -m benchmarks.packed_attention", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--row_lengths", default="512,2048,4096")
    p.add_argument("--tokens", type=int, default=4096, help="tokens per step (rows x row length)")
    p.add_argument("--median", type=float, default=128, help="median document length")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    register_packed_attention()
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=512, num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=4,
                         intermediate_size=1376, vocab_size=8192, max_position_embeddings=8192, use_cache=False)
    model = LlamaForCausalLM(config)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; Llama hidden 512, 8 layers, 8/4 heads, "
          f"vocab 8192, fp32; {args.tokens} tokens per step, documents of median ~{args.median:.0f} tokens")
    print("| row length | rows | documents | masked SDPA s | per-document SDPA s | speed-up | max logits diff |")
    print("|--:|--:|--:|--:|--:|--:|--:|")
    rng = random.Random(0)
    for length in (int(x) for x in args.row_lengths.split(",")):
        rows = max(1, args.tokens // length)
        positions = rows_of_documents(rng, rows, length, args.median)
        ids = torch.randint(0, config.vocab_size, positions.shape)
        lengths = varlen_lengths(positions)

        def step(kernel: str) -> torch.Tensor:
            model.config._attn_implementation = kernel  # the same weights under both kernels
            extra = lengths if kernel == PACKED_SDPA else {}
            out = model(input_ids=ids, position_ids=positions, labels=ids, **extra)
            out.loss.backward()
            model.zero_grad(set_to_none=True)
            return out.logits.detach()

        times: dict[str, list[float]] = {"sdpa": [], PACKED_SDPA: []}
        logits = {k: step(k) for k in times}  # warm-up
        for _ in range(args.repeats):
            for kernel in times:  # interleaved, so a burst of foreign load hits both
                t0 = time.perf_counter()
                step(kernel)
                times[kernel].append(time.perf_counter() - t0)
        masked, packed = (statistics.median(times[k]) for k in ("sdpa", PACKED_SDPA))
        diff = float((logits["sdpa"] - logits[PACKED_SDPA]).abs().max())
        docs = len(lengths["cu_seq_lens_q"]) - 1
        print(f"| {length} | {rows} | {docs} | {masked:.2f} | {packed:.2f} | {masked / packed:.2f}x | {diff:.1e} |",
              flush=True)


if __name__ == "__main__":
    common.entry(main)
