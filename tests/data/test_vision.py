"""The vision dataset path: ocrvqa_dataset rows -> label masks -> VisionCollator batches, and
llama-recipes' custom vision dataset interface."""

from __future__ import annotations

import base64
import json
import math
import pickle
import re
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from shardtune.config import ShardtuneError, parse_args
from shardtune.data import build_dataloader, load_split, pad_fraction
from shardtune.data.images import VisionCollator
from shardtune.data.stored_images import DatasetImage
from shardtune.data.vision import messages, split_indices

IGNORE = -100
KEYS = {"input_ids", "attention_mask", "labels", "pixel_values", "aspect_ratio_ids", "aspect_ratio_mask",
        "cross_attention_mask"}
CUSTOM_FILE = Path(__file__).with_name("vision_custom_dataset.py")


def _rows(names: list[str]) -> list[dict]:
    """One row per image; every third row has a second turn."""
    rows = []
    for i, name in enumerate(names):
        texts = [{"user": f"What is the title of book {i}?", "assistant": f"The quick fox {i}",
                  "source": "ocrvqa"}]
        if i % 3 == 0:
            texts.append({"user": "Who wrote it?", "assistant": f"Amanda {i}."})
        rows.append({"images": [name], "texts": texts})
    return rows


def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def _cfg(data_path, *extra: str):
    return parse_args(["--dataset", "ocrvqa_dataset", "--ocrvqa_dataset.data_path", str(data_path),
                       "--batching_strategy", "padding", "--context_length", "512", *extra]).config


def _render(processor, row: dict) -> str:
    turns = [(t["user"].strip(), t["assistant"].strip()) for t in row["texts"]]
    return processor.apply_chat_template(messages(turns, len(row["images"])), tokenize=False)


def _label_runs(labels: list[int]) -> list[list[int]]:
    runs, run = [], []
    for t in labels + [IGNORE]:
        if t != IGNORE:
            run.append(t)
        elif run:
            runs.append(run)
            run = []
    return runs


def _both_splits(cfg, processor):
    return load_split(cfg, processor, "train"), load_split(cfg, processor, "test")


# --- label masks -------------------------------------------------------------------------------

@pytest.mark.parametrize("turns", [1, 3])
def test_labels_are_the_answers_and_their_end_of_turn(tiny_processor, write_images, tmp_path, turns):
    tok = tiny_processor.tokenizer
    names = write_images(2)
    answers = ["The quick fox", "Amanda", "Yes, a lovely day."][:turns]
    row = {"images": names, "texts": [{"user": f"Question {t}: what?", "assistant": f"  {a} "}
                                      for t, a in enumerate(answers)]}
    cfg = _cfg(_jsonl(tmp_path / "rows.jsonl", [row] * 10))
    sample = load_split(cfg, tiny_processor, "train").samples[0]
    ids, labels = sample["input_ids"], sample["labels"]
    # the labelled tokens, decoded run by run, are exactly each answer (stripped) + <|eot_id|>
    assert [tok.decode(r) for r in _label_runs(labels)] == [a + "<|eot_id|>" for a in answers]
    assert all(lab in (IGNORE, t) for lab, t in zip(labels, ids))
    # the same ids as the processor gives for the rendered text; one BOS; images in the first turn
    text = _render(tiny_processor, row)
    images = [[Image.open(tmp_path / n).convert("RGB") for n in names]]
    expected = tiny_processor(images=images, text=[text], add_special_tokens=False)["input_ids"][0]
    assert ids == list(expected) and ids.count(tok.bos_token_id) == 1 and ids[0] == tok.bos_token_id
    image_id = tok.convert_tokens_to_ids("<|image|>")
    first_user_text = ids.index(image_id) + len(names)
    image_positions = [i for i, t in enumerate(ids) if t == image_id]
    assert image_positions == list(range(first_user_text - 2, first_user_text))
    assert labels[:first_user_text] == [IGNORE] * first_user_text
    assert sample["attention_mask"] == [1] * len(ids)
    assert sample["images"] == [str((tmp_path / n).resolve()) for n in names]


# --- the collator ------------------------------------------------------------------------------

def test_collator_equals_the_processor(tiny_processor, write_images, tmp_path):
    names = write_images(4)
    rows = _rows(names[:3])
    rows[1]["images"] = names[1:4]  # 3 images in one sample, 1 in the others
    split = load_split(_cfg(_jsonl(tmp_path / "rows.jsonl", rows * 4), "--ocrvqa_dataset.split_ratio",
                            "0.75"), tiny_processor, "test")
    samples = split.samples[:3]
    assert len({len(s["input_ids"]) for s in samples}) > 1 and len({len(s["images"]) for s in samples}) > 1
    batch = VisionCollator(tiny_processor)(samples)
    assert set(batch) == KEYS
    # what DataLoader workers receive: the collator and the samples, pickled
    again = pickle.loads(pickle.dumps(split.collate_fn))(pickle.loads(pickle.dumps(samples)))
    assert all(torch.equal(batch[k], again[k]) for k in KEYS)
    texts = [tiny_processor.tokenizer.decode(s["input_ids"]) for s in samples]
    images = [[Image.open(p).convert("RGB") for p in s["images"]] for s in samples]
    ref = tiny_processor(images=images, text=texts, padding=True, add_special_tokens=False,
                         return_tensors="pt")
    for key in KEYS - {"labels"}:
        assert batch[key].dtype == ref[key].dtype and torch.equal(batch[key], ref[key]), key
    width = batch["input_ids"].shape[1]
    for j, s in enumerate(samples):
        n = len(s["input_ids"])
        assert batch["labels"][j].tolist() == s["labels"] + [IGNORE] * (width - n)
        assert batch["input_ids"][j, n:].eq(tiny_processor.tokenizer.pad_token_id).all()


def test_batches_feed_the_tiny_mllama(tiny_processor, write_images, tmp_path):
    """load_split through the registry with a parsed Config, a padding loader, a forward pass."""
    from transformers import MllamaForConditionalGeneration

    from shardtune.demo.tiny import tiny_mllama_config

    cfg = _cfg(_jsonl(tmp_path / "rows.jsonl", _rows(write_images(10))), "--batch_size_training", "3")
    split = load_split(cfg, tiny_processor, "train")
    assert len(split.samples) == 9 and split.report.rows_read == 9
    loader = build_dataloader(split.samples, tokenizer=tiny_processor, strategy=cfg.train.batching_strategy,
                              batch_size=3, context_length=512, shuffle=True, seed=0,
                              collate_fn=split.collate_fn)
    loader.batch_sampler.set_epoch(0)
    batches = list(loader)
    assert len(batches) == 3 and all(set(b) == KEYS for b in batches)
    pads = sum(int((b["attention_mask"] == 0).sum()) for b in batches)
    slots = sum(b["attention_mask"].numel() for b in batches)
    assert loader.dataset.slots_known and pad_fraction(loader) == pytest.approx(pads / slots)
    torch.manual_seed(0)
    model = MllamaForConditionalGeneration(tiny_mllama_config(tiny_processor.tokenizer)).eval()
    with torch.no_grad():
        loss = model(**batches[0]).loss
    assert math.isfinite(loss.item())


def test_packing_is_refused(tiny_processor, write_images, tmp_path):
    cfg = _cfg(_jsonl(tmp_path / "rows.jsonl", _rows(write_images(10))))
    split = load_split(cfg, tiny_processor, "train")
    with pytest.raises(ShardtuneError, match=r"Vision datasets cannot be packed.*--batching_strategy "
                                             r"padding"):
        build_dataloader(split.samples, tokenizer=tiny_processor, strategy="packing", batch_size=2,
                         context_length=512, shuffle=False, seed=0, collate_fn=split.collate_fn)


# --- sources -----------------------------------------------------------------------------------

def _ids(split) -> list[list[int]]:
    return [s["input_ids"] for s in split.samples]


def test_sources_give_the_same_samples(tiny_processor, write_images, tmp_path):
    names = write_images(10)
    rows = _rows(names)
    reference = _both_splits(_cfg(_jsonl(tmp_path / "rows.jsonl", rows)), tiny_processor)
    collate = reference[0].collate_fn
    pixels = collate(reference[0].samples[:2])["pixel_values"]

    def same(split_pair):
        assert [_ids(s) for s in split_pair] == [_ids(s) for s in reference]
        assert torch.equal(collate(split_pair[0].samples[:2])["pixel_values"], pixels)

    data = [(tmp_path / n).read_bytes() for n in names]
    sub = tmp_path / "sub"
    sub.mkdir()
    # parquet: HF Image features as stored ({"bytes", "path"}), and plain binary
    as_feature = [{**r, "images": [{"bytes": b, "path": None}]} for r, b in zip(rows, data)]
    pq.write_table(pa.Table.from_pylist(as_feature), sub / "feature.parquet")
    same(_both_splits(_cfg(sub / "feature.parquet"), tiny_processor))
    as_bytes = [{**r, "images": [b]} for r, b in zip(rows, data)]
    pq.write_table(pa.Table.from_pylist(as_bytes), sub / "bytes.parquet")
    same(_both_splits(_cfg(sub / "bytes.parquet"), tiny_processor))
    # json: absolute paths and base64 data URLs
    mixed = [{**r, "images": [str(tmp_path / n) if i % 2 else
                              "data:image/png;base64," + base64.b64encode(b).decode()]}
             for i, (r, n, b) in enumerate(zip(rows, names, data))]
    (sub / "mixed.json").write_text(json.dumps(mixed))
    same(_both_splits(_cfg(sub / "mixed.json"), tiny_processor))


def test_saved_datasets_folder(tiny_processor, write_images, tmp_path):
    datasets = pytest.importorskip("datasets")
    names = write_images(10)
    rows = _rows(names)
    reference = _both_splits(_cfg(_jsonl(tmp_path / "rows.jsonl", rows)), tiny_processor)
    features = datasets.Features({"images": datasets.List(datasets.Image()),
                                  "texts": datasets.List({"user": datasets.Value("string"),
                                                          "assistant": datasets.Value("string"),
                                                          "source": datasets.Value("string")})})
    pil_rows = [{**r, "images": [Image.open(tmp_path / n)],
                 "texts": [{"source": "", **t} for t in r["texts"]]} for r, n in zip(rows, names)]
    ds = datasets.Dataset.from_list(pil_rows, features=features)
    ds.save_to_disk(str(tmp_path / "one"))  # one split: divided by split_ratio as a file is
    pair = _both_splits(_cfg(tmp_path / "one"), tiny_processor)
    assert [_ids(s) for s in pair] == [_ids(s) for s in reference]
    # the images stay in the memory-mapped dataset (encoded, undecoded) until a batch reads them
    assert all(isinstance(ref, DatasetImage) and ref.nbytes for s in pair[0].samples for ref in s["images"])
    # a DatasetDict with both splits is used as it is (max_rows caps each)
    datasets.DatasetDict({"train": ds.select(range(6)), "test": ds.select(range(6, 10))}).save_to_disk(
        str(tmp_path / "two"))
    train, test = _both_splits(_cfg(tmp_path / "two", "--ocrvqa_dataset.max_rows", "3"), tiny_processor)
    tok = tiny_processor.tokenizer
    first_answers = [[tok.decode(_label_runs(s["labels"])[0]) for s in part.samples]
                     for part in (train, test)]
    assert first_answers == [[f"The quick fox {i}<|eot_id|>" for i in rows]
                             for rows in ([0, 1, 2], [6, 7, 8])]
    assert test.report.source.endswith("two[test]")
    assert VisionCollator(tiny_processor)(train.samples)["pixel_values"].shape[0] == 3
    datasets.DatasetDict({"a": ds, "b": ds}).save_to_disk(str(tmp_path / "ab"))
    with pytest.raises(ShardtuneError, match=r"has the splits \['a', 'b'\], none of them "
                                             r"--ocrvqa_dataset.train_split 'train'"):
        load_split(_cfg(tmp_path / "ab"), tiny_processor, "train")


def test_split_sizes_and_determinism(tiny_processor, write_images, tmp_path):
    names = write_images(4)
    rows = [{"images": [names[i % 4]], "texts": [{"user": "What is it?", "assistant": f"Row {i}"}]}
            for i in range(20)]
    path = _jsonl(tmp_path / "rows.jsonl", rows)
    tok = tiny_processor.tokenizer

    def answers(split):
        return [tok.decode(_label_runs(s["labels"])[0]) for s in split.samples]

    train, test = _both_splits(_cfg(path), tiny_processor)
    assert (len(train.samples), len(test.samples)) == (18, 2)
    assert sorted(answers(train) + answers(test)) == sorted(f"Row {i}<|eot_id|>" for i in range(20))
    assert answers(train) == answers(load_split(_cfg(path), tiny_processor, "train"))  # same every time
    train_idx, test_idx = split_indices(20, 0.9, "x")
    assert answers(test) == [f"Row {i}<|eot_id|>" for i in test_idx]
    capped = _both_splits(_cfg(path, "--ocrvqa_dataset.max_rows", "10", "--ocrvqa_dataset.split_ratio",
                               "0.8"), tiny_processor)
    assert [len(s.samples) for s in capped] == [8, 2]
    assert all(int(a[4:-10]) < 10 for s in capped for a in answers(s))
    datasets = pytest.importorskip("datasets")  # the split is llama-recipes' train_test_split
    for n, ratio in [(20, 0.9), (2000, 0.9), (37, 0.75)]:
        ref = datasets.Dataset.from_dict({"i": list(range(n))}).train_test_split(
            test_size=1 - ratio, shuffle=True, seed=42)
        assert split_indices(n, ratio, "x") == (ref["train"]["i"], ref["test"]["i"])


# --- bad rows ----------------------------------------------------------------------------------

def _bad_cases(tmp_path: Path, names: list[str]) -> dict:
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not an image")
    Image.open(tmp_path / names[0]).convert("RGB").resize((64, 64)).save(tmp_path / "cut.jpg")
    data = (tmp_path / "cut.jpg").read_bytes()
    (tmp_path / "cut.jpg").write_bytes(data[: len(data) * 2 // 3])  # opens, but the pixels end early
    good = {"images": [names[0]], "texts": [{"user": "Q?", "assistant": "A."}]}
    return {
        "missing": ({**good, "images": ["nope/missing.png"]},
                    rf"names image 0 {re.escape(str(tmp_path.resolve()))}/nope/missing.png, which does not "
                    rf"exist \('nope/missing.png' is resolved against the data file's folder"),
        "corrupt": ({**good, "images": ["broken.png"]},
                    r"has an unreadable image 0 \(.*broken.png\): Unidentified"),
        "truncated_jpeg": ({**good, "images": ["cut.jpg"]},
                           r"has an unreadable image 0 \(.*cut.jpg\): OSError"),
        "no_text": ({"images": [names[0]], "texts": []}, r"has no text"),
        "empty_answer": ({**good, "texts": [{"user": "Q?", "assistant": "  "}]},
                         r"texts\[0\] has an empty or missing 'assistant' turn"),
        "empty_user": ({**good, "texts": [{"user": "", "assistant": "A."}]},
                       r"texts\[0\] has an empty or missing 'user' turn"),
        "no_images": ({**good, "images": []}, r"has no images"),
        "image_count": ({**good, "texts": [{"user": "<|image|> Q?", "assistant": "A."}]},
                        r"has 1 image\(s\) but its text renders 2 <\|image\|> tokens"),
    }


@pytest.mark.parametrize("case", ["missing", "corrupt", "truncated_jpeg", "no_text", "empty_answer",
                                  "empty_user", "no_images", "image_count"])
def test_bad_rows_are_named(tiny_processor, write_images, tmp_path, case):
    names = write_images(1)
    bad, message = _bad_cases(tmp_path, names)[case]
    good = {"images": [names[0]], "texts": [{"user": "Q?", "assistant": "A."}]}
    path = _jsonl(tmp_path / "rows.jsonl", [good, bad] + [good] * 8)
    cfg = _cfg(path, "--ocrvqa_dataset.split_ratio", "0.5")
    split = "train" if 1 in split_indices(10, 0.5, "x")[0] else "test"
    with pytest.raises(ShardtuneError, match=rf"rows.jsonl, row 1, line 2 \({split} split.*the row {message}"
                                             rf".*--skip_bad_rows"):
        load_split(cfg, tiny_processor, split)


def test_skip_bad_rows_counts(tiny_processor, write_images, tmp_path):
    names = write_images(1)
    cases = _bad_cases(tmp_path, names)
    good = {"images": [names[0]], "texts": [{"user": "Q?", "assistant": "A."}]}
    rows = [row for row, _ in cases.values()] + [good] * 3
    cfg = _cfg(_jsonl(tmp_path / "rows.jsonl", rows), "--skip_bad_rows",
               "--ocrvqa_dataset.split_ratio", "0.1")
    train, test = _both_splits(cfg, tiny_processor)
    n_bad = len(cases)
    assert train.report.skipped_bad + test.report.skipped_bad == n_bad
    assert len(train.samples) + len(test.samples) == 3
    assert len(train.report.bad_examples) == min(3, train.report.skipped_bad)


# --- processor and source errors ---------------------------------------------------------------

def test_processor_without_chat_template_or_a_tokenizer_is_refused(tiny_processor, tiny_tokenizer,
                                                                   write_images, tmp_path):
    import copy

    cfg = _cfg(_jsonl(tmp_path / "rows.jsonl", _rows(write_images(10))))
    with pytest.raises(ShardtuneError, match=r"needs a vision model's processor"):
        load_split(cfg, tiny_tokenizer, "train")
    bare = copy.copy(tiny_processor)
    bare.chat_template = None
    bare.tokenizer = copy.copy(tiny_processor.tokenizer)
    bare.tokenizer.chat_template = None
    with pytest.raises(ShardtuneError, match=r"has no chat template"):
        load_split(cfg, bare, "train")


def test_hub_without_datasets_is_clear(tiny_processor, monkeypatch, tmp_path):
    import sys

    from shardtune.data import check_data_source

    monkeypatch.setitem(sys.modules, "datasets", None)
    cfg = _cfg("")
    with pytest.raises(ShardtuneError, match=r"HuggingFaceM4/the_cauldron.*needs the `datasets` package"
                                             r".*--ocrvqa_dataset.data_path"):
        check_data_source(cfg)
    (tmp_path / "saved").mkdir()
    (tmp_path / "saved" / "state.json").write_text("{}")
    with pytest.raises(ShardtuneError, match=r"folder written by `datasets`.*needs the `datasets` package"):
        check_data_source(_cfg(tmp_path / "saved"))
    with pytest.raises(ShardtuneError, match=r"is a folder, but not one written by `datasets`"):
        load_split(_cfg(tmp_path), tiny_processor, "train")


# --- llama-recipes' custom vision dataset interface --------------------------------------------

def test_custom_vision_dataset_file(tiny_processor, write_images, tmp_path):
    shutil.copy(CUSTOM_FILE, tmp_path / "ocrvqa_dataset.py")
    rows = _jsonl(tmp_path / "rows.jsonl", _rows(write_images(10)))
    cfg = parse_args(["--dataset", "custom_dataset",
                      "--custom_dataset.file", str(tmp_path / "ocrvqa_dataset.py"),
                      "--custom_dataset.test_split", "test", "--custom_dataset.data_path", str(rows),
                      "--batching_strategy", "padding"]).config
    split = load_split(cfg, tiny_processor, "train")
    assert len(split.samples) == 9 and isinstance(split.samples[0]["images"][0], Image.Image)
    loader = build_dataloader(split.samples, tokenizer=tiny_processor, strategy="padding", batch_size=2,
                              context_length=512, shuffle=False, seed=0, collate_fn=split.collate_fn)
    loader.batch_sampler.set_epoch(0)
    batch = next(iter(loader))
    assert KEYS <= set(batch) and batch["pixel_values"].shape[:3] == (2, 1, 2)
    tok = tiny_processor.tokenizer
    answers = [tok.decode(r) for r in _label_runs(batch["labels"][0].tolist())]
    assert answers and all(a.endswith("<|eot_id|>") for a in answers)
    with pytest.raises(ShardtuneError, match=r"Vision datasets cannot be packed"):
        build_dataloader(split.samples, tokenizer=tiny_processor, strategy="packing", batch_size=2,
                         context_length=512, shuffle=False, seed=0, collate_fn=split.collate_fn)


def test_cookbook_collator_batch_feature_is_accepted(tiny_processor, write_images, tmp_path):
    """llama-cookbook's collator returns the processor's BatchFeature (a UserDict, not a dict):
    every batch of both ranks' loaders, fillers included, arrives as a plain dict with the images."""
    from transformers import BatchFeature

    from shardtune.data.custom import load_module

    shutil.copy(CUSTOM_FILE, tmp_path / "ocrvqa_dataset.py")
    rows = _jsonl(tmp_path / "rows.jsonl", _rows(write_images(10)))
    cfg = parse_args(["--dataset", "custom_dataset", "--custom_dataset.file", str(tmp_path / "ocrvqa_dataset.py"),
                      "--custom_dataset.data_path", str(rows), "--batching_strategy", "padding"]).config
    split = load_split(cfg, tiny_processor, "train")  # 9 samples: rank 1's last batch holds a filler
    cookbook = load_module(tmp_path / "ocrvqa_dataset.py").get_data_collator(tiny_processor)
    assert isinstance(cookbook([split.samples[0]]), BatchFeature)
    seen = 0
    for rank in (0, 1):
        loader = build_dataloader(split.samples, tokenizer=tiny_processor, strategy="padding", batch_size=2,
                                  context_length=512, shuffle=False, seed=0, rank=rank, world_size=2,
                                  drop_last=False, collate_fn=split.collate_fn, required_keys=("pixel_values",))
        loader.batch_sampler.set_epoch(0)
        for batch in loader:
            assert type(batch) is dict and KEYS <= set(batch)
            seen += int((batch["labels"] != IGNORE).any(dim=1).sum())
    assert seen == 9  # the filler row carries no labels


def test_overlong_samples_are_truncated_with_their_images(tiny_processor, write_images, tmp_path):
    rows = _rows(write_images(10))
    full = load_split(_cfg(_jsonl(tmp_path / "rows.jsonl", rows)), tiny_processor, "train")
    cut = min(len(s["input_ids"]) for s in full.samples) + 4  # only the two-turn rows are longer
    split = load_split(_cfg(tmp_path / "rows.jsonl", "--context_length", str(cut)), tiny_processor, "train")
    longer = sum(len(s["input_ids"]) > cut for s in full.samples)
    assert longer and split.report.truncated == longer and len(split.samples) == len(full.samples)
    assert max(len(s["input_ids"]) for s in split.samples) == cut
    assert all(s["images"] == f["images"] for s, f in zip(split.samples, full.samples))
    batch = split.collate_fn(split.samples)
    assert batch["input_ids"].shape[1] == cut and batch["cross_attention_mask"].shape[1] == cut


def test_hub_offline_is_clear(tiny_processor):
    """datasets installed but offline (conftest sets HF_HUB_OFFLINE=1): one error saying what to pass."""
    pytest.importorskip("datasets")
    cfg = parse_args(["--dataset", "ocrvqa_dataset"]).config
    with pytest.raises(ShardtuneError, match=r"Could not load 'HuggingFaceM4/the_cauldron' subset 'ocrvqa'.*"
                                             r"--ocrvqa_dataset.data_path"):
        load_split(cfg, tiny_processor, "train")


# --- images left in the source -----------------------------------------------------------------

def _noise_png(seed: int, side: int = 96) -> bytes:
    import io

    import numpy as np

    pixels = np.random.RandomState(seed).randint(0, 256, size=(side, side, 3)).astype("uint8")
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="PNG")
    return out.getvalue()


def _embedded_source(kind: str, folder: Path, rows: list[dict]) -> Path:
    if kind == "parquet":  # several row groups, as files of real size have
        pq.write_table(pa.Table.from_pylist(rows), folder / "rows.parquet", row_group_size=7)
        return folder / "rows.parquet"
    datasets = pytest.importorskip("datasets")
    features = datasets.Features({"images": datasets.List(datasets.Image()),
                                  "texts": datasets.List({"user": datasets.Value("string"),
                                                          "assistant": datasets.Value("string")})})
    datasets.Dataset.from_list(rows, features=features).save_to_disk(str(folder / "saved"))
    return folder / "saved"


@pytest.mark.parametrize("kind", ["parquet", "save_to_disk"])
def test_samples_keep_references_not_the_images_bytes(tiny_processor, tmp_path, kind):
    """Sources that embed the images (OCR-VQA: ~165k rows) would put every image in every rank and
    DataLoader worker: samples keep where each image is, and the collator reads a batch's own."""
    data = [_noise_png(i) for i in range(24)]  # ~28 KB each
    rows = [{"images": [{"bytes": b, "path": None}],
             "texts": [{"user": f"What is image {i}?", "assistant": f"Noise {i}"}]} for i, b in enumerate(data)]
    source = _embedded_source(kind, tmp_path, rows)
    files = sorted(p for p in source.rglob("*") if p.is_file()) if source.is_dir() else [source]
    before = {p: p.stat().st_mtime_ns for p in files}
    train = load_split(_cfg(source), tiny_processor, "train")
    answers = [tiny_processor.tokenizer.decode(_label_runs(s["labels"])[0]) for s in train.samples]
    in_split = sum(len(data[int(a.removeprefix("Noise ").removesuffix("<|eot_id|>"))]) for a in answers)
    assert len(pickle.dumps(train.samples)) < in_split / 10  # what every worker is sent
    # the batches are those of the same rows with their bytes in memory (data URLs)
    inline = [{**r, "images": ["data:image/png;base64," + base64.b64encode(b).decode()]} for r, b in zip(rows, data)]
    reference = load_split(_cfg(_jsonl(tmp_path / "inline.jsonl", inline)), tiny_processor, "train")
    assert _ids(reference) == _ids(train)
    collate = train.collate_fn
    for start in range(0, len(train.samples), 8):
        assert torch.equal(collate(train.samples[start:start + 8])["pixel_values"],
                           collate(reference.samples[start:start + 8])["pixel_values"])
    # the source was read, never written (no cache file beside a saved dataset)
    if source.is_dir():
        assert sorted(p for p in source.rglob("*") if p.is_file()) == files
    assert {p: p.stat().st_mtime_ns for p in files} == before


def test_an_unreadable_embedded_image_names_its_file_and_row(tiny_processor, tmp_path):
    rows = [{"images": [{"bytes": _noise_png(i), "path": None}], "texts": [{"user": "Q?", "assistant": "A."}]}
            for i in range(10)]
    rows[8]["images"] = [{"bytes": b"\x89PNG\r\n\x1a\n this is not an image", "path": None}]
    path = _embedded_source("parquet", tmp_path, rows)
    cfg = _cfg(path, "--ocrvqa_dataset.split_ratio", "0.5")
    split = "train" if 8 in split_indices(10, 0.5, "x")[0] else "test"
    with pytest.raises(ShardtuneError, match=r"rows.parquet, row 8 \(.*the row has an unreadable image 0 \(29 bytes of "
                                             r"image data at .*rows.parquet, row group 1, row 1 of the group\): "
                                             r"Unidentified.*--skip_bad_rows"):
        load_split(cfg, tiny_processor, split)
