"""The load-time image check divided among 2 real ranks (data/image_checks.py): each rank decodes
only its share of a vision split's images (rows i % 2 == rank), the ranks exchange the bad rows,
and both end with the samples, skip counts and messages of one process checking everything.

The 2-rank loads run in the session's shared torchrun launch (``run_fsdp_cases``, kind "data").
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from shardtune.config import ShardtuneError, parse_args
from shardtune.data import load_split
from shardtune.data.image_checks import Share
from shardtune.data.images import describe
from shardtune.data.vision import split_indices
from shardtune.model.loading import load_inputs

N_ROWS = 24
BROKEN = b"\x89PNG\r\n\x1a\n this is not an image"
# split positions whose image is corrupt: rank 1's (odd) and rank 0's (even) in each split; the first
# bad row of the train split is rank 1's, so rank 0 can only name it from the exchange
CORRUPT = {"train": (1, 4), "test": (0, 3)}
SPLITS = ("train", "test")


def _corrupt_rows(source: str) -> list[int]:
    train, test = split_indices(N_ROWS, 0.5, source)
    return [train[p] for p in CORRUPT["train"]] + [test[p] for p in CORRUPT["test"]]


def _png(i: int) -> bytes:
    import io

    import numpy as np
    from PIL import Image

    pixels = np.random.RandomState(i).randint(0, 256, size=(20 + i % 7, 24 + i % 5, 3)).astype("uint8")
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="PNG")
    return out.getvalue()


def _sources(folder: Path) -> dict[str, Path]:
    """The same rows as a JSON-lines file naming image files and as a parquet file embedding the
    images (row groups of 5), with the images of ``_corrupt_rows`` corrupt."""
    bad = set(_corrupt_rows("x"))
    images = [BROKEN if i in bad else _png(i) for i in range(N_ROWS)]
    texts = [[{"user": f"What is in picture {i}?", "assistant": f"Noise number {i}"}] for i in range(N_ROWS)]
    (folder / "images").mkdir()
    for i, data in enumerate(images):
        (folder / "images" / f"{i}.png").write_bytes(data)
    jsonl = folder / "rows.jsonl"
    jsonl.write_text("".join(json.dumps({"images": [f"images/{i}.png"], "texts": t}) + "\n"
                             for i, t in enumerate(texts)))
    embedded = [{"images": [{"bytes": data, "path": None}], "texts": t} for data, t in zip(images, texts)]
    pq.write_table(pa.Table.from_pylist(embedded), folder / "rows.parquet", row_group_size=5)
    chat = folder / "chat.jsonl"  # the same rows as --dataset chat_dataset conversations
    chat.write_text("".join(json.dumps({"images": [f"images/{i}.png"], "messages": [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": t[0]["user"]}]},
        {"role": "assistant", "content": t[0]["assistant"]}]}) + "\n" for i, t in enumerate(texts)))
    return {"jsonl": jsonl, "parquet": folder / "rows.parquet", "chat": chat}


def _args(model: Path, source: Path, *extra: str) -> list[str]:
    data = (["--dataset", "chat_dataset", "--chat_dataset.data_path", str(source), "--eval_fraction", "0.5"]
            if source.name == "chat.jsonl" else
            ["--dataset", "ocrvqa_dataset", "--ocrvqa_dataset.data_path", str(source), "--ocrvqa_dataset.split_ratio", "0.5"])
    return ["--model_name", str(model), *data, "--batching_strategy", "padding", "--context_length", "512", *extra]


def _record(sample: dict) -> dict:  # as fsdp_worker.sample_record writes it
    return {**{k: list(sample[k]) for k in ("input_ids", "labels", "attention_mask")},
            "images": [describe(ref) for ref in sample["images"]]}


@pytest.fixture(scope="module")
def setting(tiny_vision_model_dir, tmp_path_factory, run_fsdp_cases):
    """The sources, the 2 ranks' loads of them (one launch) and one process's."""
    root = tmp_path_factory.mktemp("image-checks")
    sources = _sources(root)
    model = tiny_vision_model_dir
    cases = {fmt: {"kind": "data", "args": _args(model, path, "--skip_bad_rows")} for fmt, path in sources.items()}
    cases["jsonl_strict"] = {"kind": "data", "expect_error": True, "args": _args(model, sources["jsonl"])}
    ranks = run_fsdp_cases(root, cases)
    processor = load_inputs(str(model))
    one = {fmt: {split: load_split(parse_args(_args(model, path, "--skip_bad_rows")).config, processor, split)
                 for split in SPLITS} for fmt, path in sources.items()}
    return {"sources": sources, "ranks": ranks, "one": one, "processor": processor, "model": model}


@pytest.mark.parametrize("fmt", ["jsonl", "parquet", "chat"])
def test_both_ranks_skip_every_bad_row_as_one_process_does(setting, fmt):
    assert sum(setting["one"][fmt][split].report.skipped_bad for split in SPLITS) == len(_corrupt_rows("x"))
    for split in SPLITS:
        one = setting["one"][fmt][split]
        expected = [_record(s) for s in one.samples]
        assert len(expected) == N_ROWS // 2 - one.report.skipped_bad
        assert fmt == "chat" or one.report.skipped_bad == 2  # one in each rank's share
        assert all("unreadable image 0" in e for e in one.report.bad_examples)
        for rank, loaded in enumerate(setting["ranks"][fmt]):
            got = loaded[split]
            assert got["samples"] == expected, f"rank {rank}, {split}"
            report = {k: v for k, v in got["report"].items() if k != "images_checked"}
            assert report == {k: v for k, v in vars(one.report).items() if k != "images_checked"}, f"rank {rank}"


@pytest.mark.parametrize("fmt", ["jsonl", "parquet", "chat"])
def test_each_rank_checks_only_its_share(setting, fmt):
    for split in SPLITS:
        n = N_ROWS // 2
        assert setting["one"][fmt][split].report.images_checked == n  # one process: every image
        for rank, loaded in enumerate(setting["ranks"][fmt]):
            got = loaded[split]
            assert got["report"]["images_checked"] == len(range(rank, n, 2))
            if fmt == "parquet":  # embedded images are decoded as they are read: the rank's rows only
                assert got["read_checked"] and all(p % 2 == rank for p in got["read_checked"])
                assert got["read_unchecked"] and all(p % 2 != rank for p in got["read_unchecked"])


def test_without_skip_bad_rows_every_rank_names_the_first_bad_row(setting):
    """The first bad row of the train split is rank 1's: rank 0 names it from the exchange."""
    model, source = setting["model"], setting["sources"]["jsonl"]
    with pytest.raises(ShardtuneError) as one:
        load_split(parse_args(_args(model, source)).config, setting["processor"], "train")
    row = split_indices(N_ROWS, 0.5, "x")[0][CORRUPT["train"][0]]
    assert re.search(rf"rows.jsonl, row {row}, line {row + 1} \(train split.*unreadable image 0", str(one.value))
    assert setting["ranks"]["jsonl_strict"] == {"error": str(one.value)}


def test_an_exchange_that_misses_a_rank_is_an_error():
    with pytest.raises(ShardtuneError, match="rank 1 of 2 needs the other ranks' findings"):
        Share(1, 2, lambda mine: [mine]).exchange([])
