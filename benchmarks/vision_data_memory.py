"""Host RAM of ``--dataset ocrvqa_dataset`` per rank and per DataLoader worker, at real scale.

What it measures
----------------
``--rows`` (default 20,000) rows of the_cauldron's shape, one generated image each: a PNG of random
pixels (``--side`` px square, ~10 KB: incompressible, like photos; cheap to check), or with
``--jpeg`` a book-cover-sized JPEG (``--side`` x 1.5 ``--side`` px, smooth colour fields with a
little noise; a JPEG is checked by decoding it, which costs more), written once under ``--workdir`` as

* ``jsonl``: a JSON-lines file whose rows name their image files (one file per image), and
* ``parquet``: one parquet file with the images embedded as Hugging Face ``Image`` features
  (``{"bytes", "path"}``, row groups of 100 rows as ``datasets`` writes image columns), as
  OCR-VQA / the_cauldron come from the hub.

Then, per format, two fresh processes (spawned, as torchrun would start 2 ranks, joined in a gloo
process group) each do what the recipe's ``setup_data`` does on its rank: ``load_split(cfg,
processor, "train", data_share(env))`` (the rank checks its share of the images, the ranks exchange
the bad rows) and ``build_dataloader(..., rank=r, world_size=2, num_workers=1)`` (a fork-server
worker that is sent the samples by pickling), then read ``--batches`` batches. Each rank reports
its ``load_split`` time, the images it decoded to check them (``DataReport.images_checked``), its
RSS (``psutil``) before loading, after ``load_split``, and after the batches, the size of its
pickled samples (what each worker is sent) and the RSS of its DataLoader worker. The processor is
the tiny one (``shardtune.demo.tiny``: 28-px tiles), so tokenising and the image processor cost
little and RAM is the data's.

Usage::

    python -m benchmarks.vision_data_memory [--workdir /tmp/vision-mem] [--rows 20000] [--formats jsonl parquet]

Run it against another source tree with ``PYTHONPATH=OTHER/src`` to compare (it uses only
``load_split``, ``build_dataloader``, ``build_tiny_processor``, ``init_distributed`` and, where the
tree has it, ``finetuning.data_share``; a tree without it checks every image on every rank, shown
as "all").
"""

from __future__ import annotations

import argparse
import io
import json
import multiprocessing
import os
import pickle
import time
from pathlib import Path

from . import common

MIB = 2 ** 20


def _png(seed: int, side: int) -> bytes:
    import numpy as np
    from PIL import Image

    pixels = np.random.RandomState(seed).randint(0, 256, size=(side, side, 3)).astype("uint8")
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="PNG")
    return out.getvalue()


def _jpeg(seed: int, side: int) -> bytes:
    import numpy as np
    from PIL import Image

    rng = np.random.RandomState(seed)
    coarse = Image.fromarray(rng.randint(0, 256, size=(12, 8, 3)).astype("uint8"))
    pixels = np.asarray(coarse.resize((side, side * 3 // 2), Image.BILINEAR), dtype=np.int16)
    pixels = np.clip(pixels + rng.randint(-12, 13, size=pixels.shape), 0, 255).astype("uint8")
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="JPEG", quality=85)
    return out.getvalue()


def _texts(i: int) -> list[dict]:
    return [{"user": f"What is the title of book {i}?", "assistant": f"The quick fox {i}"}]


def generate(workdir: Path, rows: int, side: int, jpeg: bool = False) -> dict[str, Path]:
    """The two sources (reused when already there with the same row count)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    workdir.mkdir(parents=True, exist_ok=True)
    stamp = workdir / "generated.json"
    jsonl, parquet = workdir / "rows.jsonl", workdir / "rows.parquet"
    kind = {"rows": rows, "side": side, **({"jpeg": True} if jpeg else {})}
    if stamp.is_file() and json.loads(stamp.read_text()) == kind:
        return {"jsonl": jsonl, "parquet": parquet}
    images = workdir / "images"
    images.mkdir(exist_ok=True)
    writer, batch, total = None, [], 0
    with jsonl.open("w") as lines:
        for i in range(rows):
            data, name = (_jpeg(i, side), f"{i}.jpg") if jpeg else (_png(i, side), f"{i}.png")
            total += len(data)
            (images / name).write_bytes(data)
            lines.write(json.dumps({"images": [f"images/{name}"], "texts": _texts(i)}) + "\n")
            batch.append({"images": [{"bytes": data, "path": None}], "texts": _texts(i)})
            if len(batch) == 100 or i == rows - 1:
                table = pa.Table.from_pylist(batch)
                writer = writer or pq.ParquetWriter(parquet, table.schema)
                writer.write_table(table, row_group_size=100)
                batch = []
    writer.close()
    stamp.write_text(json.dumps(kind))
    print(f"generated {rows} images ({total / MIB:.0f} MiB of {'JPEG' if jpeg else 'PNG'}) under {workdir}", flush=True)
    return {"jsonl": jsonl, "parquet": parquet}


def _rss(pid: int | None = None) -> float:
    import psutil

    return psutil.Process(pid or os.getpid()).memory_info().rss / MIB


def rank_main(rank: int, world: int, port: int, source: str, batches: int, out: str) -> None:
    import torch

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world))
    from shardtune.parallel.distributed import end_process, init_distributed

    env = init_distributed("cpu", need_group=True)
    Path(out).write_text(json.dumps(_rank_record(env, source, batches)))
    end_process(0)  # a rank of a gloo group leaves without interpreter teardown (TRAPS.md)


def _rank_record(env, source: str, batches: int) -> dict:
    from shardtune.config import parse_args
    from shardtune.data import build_dataloader, load_split
    from shardtune.demo.tiny import build_tiny_processor

    rank, world = env.rank, env.world_size
    try:
        from shardtune.finetuning import data_share
        share_args = (data_share(env),)
    except ImportError:  # a tree from before the shared check: every rank checks every image
        share_args = ()
    processor = build_tiny_processor()
    cfg = parse_args(["--dataset", "ocrvqa_dataset", "--ocrvqa_dataset.data_path", source,
                      "--batching_strategy", "padding", "--context_length", "512"]).config
    record = {"rank": rank, "rss_start": _rss()}
    start, cpu_start = time.perf_counter(), time.process_time()
    split = load_split(cfg, processor, "train", *share_args)
    # CPU time as well as wall time: on a shared machine the wall time is mostly the other jobs'
    record.update(load_s=time.perf_counter() - start, load_cpu_s=time.process_time() - cpu_start,
                  rss_after_load=_rss(), samples=len(split.samples),
                  pickled_mib=len(pickle.dumps(split.samples)) / MIB,
                  images_checked=getattr(split.report, "images_checked", None) if share_args else None)
    loader = build_dataloader(split.samples, tokenizer=processor, strategy="padding", batch_size=4,
                              context_length=512, shuffle=True, seed=0, rank=rank, world_size=world,
                              num_workers=1, collate_fn=split.collate_fn)
    loader.batch_sampler.set_epoch(0)
    it = iter(loader)
    for _ in range(batches):
        next(it)
    workers = [w.pid for w in getattr(it, "_workers", [])]  # benchmark only: the worker's pid
    record.update(rss_after_batches=_rss(), worker_rss=[_rss(pid) for pid in workers])
    del it  # shuts its worker down
    return record


def measure(source: Path, world: int, batches: int, workdir: Path) -> list[dict]:
    import socket

    ctx = multiprocessing.get_context("spawn")
    outs = [workdir / f"rank{r}.json" for r in range(world)]
    for o in outs:
        o.unlink(missing_ok=True)
    with socket.socket() as sock:  # a free port for the ranks' rendezvous
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    procs = [ctx.Process(target=rank_main, args=(r, world, port, str(source), batches, str(outs[r])))
             for r in range(world)]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
    return [json.loads(o.read_text()) for o in outs]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.vision_data_memory", description=__doc__.split("\n\n")[0])
    ap.add_argument("--workdir", type=Path, default=None,
                    help="keep the generated rows and images here, reused by later runs (default: a temporary folder)")
    ap.add_argument("--rows", type=int, default=20_000)
    ap.add_argument("--side", type=int, default=None,
                    help="image side in pixels (default 56: ~9.5 KB PNGs; with --jpeg 320: 320x480 JPEGs)")
    ap.add_argument("--jpeg", action="store_true", help="book-cover-sized JPEGs instead of small PNGs")
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--batches", type=int, default=5)
    ap.add_argument("--formats", nargs="+", default=["jsonl", "parquet"], choices=["jsonl", "parquet"])
    args = ap.parse_args(argv)
    with common.work_folder(args.workdir, "shardtune_vision_mem_") as work:
        sources = generate(work, args.rows, args.side or (320 if args.jpeg else 56), args.jpeg)
        import shardtune

        print(f"shardtune from {Path(shardtune.__file__).parent}", flush=True)
        print("| format | rank | samples | load_split s | load_split CPU s | images checked | RSS start MiB "
              "| after load_split | after batches | pickled samples MiB | worker RSS MiB |")
        print("|---|---|---|---|---|---|---|---|---|---|---|")
        for fmt in args.formats:
            for r in measure(sources[fmt], args.ranks, args.batches, work):
                checked = "all" if r.get("images_checked") is None else r["images_checked"]
                print(f"| {fmt} | {r['rank']} | {r['samples']} | {r['load_s']:.1f} | {r['load_cpu_s']:.1f} | {checked} | "
                      f"{r['rss_start']:.0f} | "
                      f"{r['rss_after_load']:.0f} | {r['rss_after_batches']:.0f} | {r['pickled_mib']:.1f} | "
                      f"{', '.join(f'{w:.0f}' for w in r['worker_rss'])} |", flush=True)


if __name__ == "__main__":
    common.entry(main)
