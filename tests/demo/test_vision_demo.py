"""``shardtune demo --vision``: its image task, its scoring, and the command end to end."""

from __future__ import annotations

import json
import os
import re
from collections import Counter

import pytest

from shardtune.demo.accuracy import first_word
from shardtune.demo.vision_task import COLOURS, QUESTION, read_rows, write_vision_task


# --- the task ---------------------------------------------------------------------------------

def test_rows_and_images_are_a_pure_function_of_the_seed(tmp_path):
    a = write_vision_task(tmp_path / "a", 60, 20, seed=3)
    b = write_vision_task(tmp_path / "b", 60, 20, seed=3)
    c = write_vision_task(tmp_path / "c", 60, 20, seed=4)
    for pa, pb in zip(a, b):
        assert pa.read_bytes() == pb.read_bytes()
    files = lambda root: {p.name: p.read_bytes() for p in (root / "images").iterdir()}  # noqa: E731
    assert files(tmp_path / "a") == files(tmp_path / "b")
    assert files(tmp_path / "a") != files(tmp_path / "c")


def test_rows_are_the_cauldron_format_with_relative_image_paths(tmp_path):
    from PIL import Image

    train_path, eval_path = write_vision_task(tmp_path, 200, 40, seed=0)
    assert (train_path.name, eval_path.name) == ("train.jsonl", "eval.jsonl")
    raw = [json.loads(line) for line in train_path.read_text().splitlines()]
    assert len(raw) == 200 and len(read_rows(eval_path)) == 40
    for row in raw:
        assert set(row) == {"images", "texts"} and len(row["images"]) == 1
        assert not os.path.isabs(row["images"][0])  # relative to the JSONL file's folder
        assert row["texts"] == [{"user": QUESTION, "assistant": row["texts"][0]["assistant"]}]
        assert row["texts"][0]["assistant"] in COLOURS
    row = read_rows(train_path)[0]  # read_rows resolves the paths
    with Image.open(row["images"][0]) as img:
        assert img.size == (28, 28) and img.mode == "RGB"
    counts = Counter(r["texts"][0]["assistant"] for r in raw)
    assert set(counts) == set(COLOURS) and min(counts.values()) >= 30  # every colour, roughly even


def test_held_out_images_are_never_trained_on(tmp_path):
    train_path, eval_path = write_vision_task(tmp_path, 500, 100, seed=1)
    pixels = lambda path: [open(r["images"][0], "rb").read() for r in read_rows(path)]  # noqa: E731
    train, held_out = pixels(train_path), pixels(eval_path)
    assert len(set(train)) == 500 and len(set(held_out)) == 100
    assert not set(train) & set(held_out)


def test_answers_are_four_tokens_whose_first_token_names_the_colour():
    """The premise of the task (see its docstring): the image decides one token, and equal answer
    lengths keep length-grouped batches mixed."""
    from shardtune.demo.tiny import build_tiny_processor

    tokenizer = build_tiny_processor().tokenizer
    tokens = {colour: tokenizer.tokenize(colour) for colour in COLOURS}
    assert {len(t) for t in tokens.values()} == {4}, tokens
    assert len({t[0] for t in tokens.values()}) == len(COLOURS), tokens


def test_first_word_scoring():
    assert first_word("blue") == "blue"
    assert first_word("  Blue.\n") == "blue"
    assert first_word("blue shape") == "blue"
    assert first_word("bluegreen") == "bluegreen"
    assert first_word("") == ""


# --- the command ------------------------------------------------------------------------------

@pytest.mark.slow
def test_shardtune_demo_vision_learns_and_writes_a_loadable_model(tmp_path, shardtune_cli):
    """~90 s on this 2-core machine: the whole demo on 2 FSDP ranks (tuned for seeds 0-15)."""
    out_dir = tmp_path / "demo"
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
    proc = shardtune_cli(["demo", "--vision", "--output_dir", str(out_dir)], timeout=600, env=env)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    summary = re.search(r"before (\d+\.\d)%\s+->\s+after (\d+\.\d)%\s+\((learned|DID NOT LEARN)\)", proc.stdout)
    assert summary, proc.stdout[-4000:]
    before, after, verdict = float(summary[1]), float(summary[2]), summary[3]
    assert verdict == "learned" and before <= 40.0 and after >= 80.0 and after >= before + 40, summary[0]
    assert "fine-tuning on 2 FSDP ranks" in proc.stdout
    converted = re.search(r"max \|logit difference\| (\S+) \((.*?)\)", proc.stdout)
    assert converted and float(converted[1]) <= 1e-5 and converted[2] == "the same model", proc.stdout[-2000:]

    model_dir = out_dir / "model"
    names = {p.name for p in model_dir.iterdir()}
    assert {"config.json", "tokenizer.json", "metrics.json"} <= names, sorted(names)
    assert names & {"processor_config.json", "preprocessor_config.json"}, sorted(names)  # the processor too
    assert list(model_dir.glob("*.safetensors")) and list((out_dir / "converted").glob("*.safetensors"))
