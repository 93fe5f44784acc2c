"""``shardtune demo``: its task data, its scoring, and the command end to end."""

from __future__ import annotations

import json
import os
import re

import pytest

from shardtune.data.prompts import alpaca_prompt
from shardtune.demo.accuracy import score
from shardtune.outputs.ownership import foreign_entries, owned
from shardtune.demo.task import INSTRUCTION, KINDS, kind_of, make_code, make_examples, write_task_data

CAPITALS, EVENS, SMALLS, ODDS = (members for _, members in KINDS)


# --- the task ---------------------------------------------------------------------------------

def test_rows_are_a_pure_function_of_the_seed(tmp_path):
    assert make_examples(200, seed=3) == make_examples(200, seed=3)
    assert make_examples(200, seed=3) != make_examples(200, seed=4)
    a = write_task_data(tmp_path / "a", 300, 50, seed=7)
    b = write_task_data(tmp_path / "b", 300, 50, seed=7)
    for pa, pb in zip(a, b):
        assert pa.read_bytes() == pb.read_bytes()


def test_write_task_data_writes_alpaca_rows_with_held_out_inputs_never_trained_on(tmp_path):
    train_path, eval_path = write_task_data(tmp_path, 1000, 100, seed=0)
    assert (train_path.name, eval_path.name) == ("train.json", "eval.json")
    train, held_out = json.loads(train_path.read_text()), json.loads(eval_path.read_text())
    assert len(train) == 1000 and len(held_out) == 100
    for row in train + held_out:
        assert set(row) == {"instruction", "input", "output"}
        assert row["instruction"] == INSTRUCTION and row["input"] and row["output"]
    train_inputs = {r["input"] for r in train}
    held_out_inputs = {r["input"] for r in held_out}
    assert len(train_inputs) == 1000 and len(held_out_inputs) == 100  # no duplicates either
    assert not train_inputs & held_out_inputs


def test_the_answer_is_the_items_in_kind_order_run_together():
    assert make_code("7,k,B,4") == "B4k7"
    assert make_code("B,4,k,7") == "B4k7"
    assert make_code("a,1,0,Z") == "Z0a1"
    for row in make_examples(500, seed=1):
        items = row["input"].split(",")
        assert sorted(kind_of(i) for i in items) == [0, 1, 2, 3]  # one item of each kind
        capital, even, small, odd = row["output"]  # exactly four characters
        assert capital in CAPITALS and even in EVENS and small in SMALLS and odd in ODDS
        assert sorted(row["output"]) == sorted(items)  # the same items, reordered


def test_inputs_come_in_every_order():
    orders = {tuple(kind_of(i) for i in r["input"].split(",")) for r in make_examples(500, seed=0)}
    assert len(orders) == 24  # all 4! arrangements, so the answer order is never a copy


def test_make_code_rejects_inputs_without_one_item_of_each_kind():
    for bad in ("B,4,k", "B,4,k,7,1", "B,C,k,7", "B,4,k,?"):
        with pytest.raises(ValueError):
            make_code(bad)


def test_every_item_is_one_token_in_prompt_and_answer(tiny_tokenizer):
    """The premise of the task (see its docstring): one token per item, whatever BPE learned."""
    for row in make_examples(300, seed=2):
        prompt = alpaca_prompt(row)
        prompt_ids = tiny_tokenizer.encode(prompt)
        ids = tiny_tokenizer.encode(prompt + row["output"])
        assert ids[:len(prompt_ids)] == prompt_ids
        assert tiny_tokenizer.convert_ids_to_tokens(ids[len(prompt_ids):]) == list(row["output"])
        assert tiny_tokenizer.tokenize(row["input"]) == list(row["input"])  # "7,k,B,4": 7 tokens


def test_no_prompt_token_outside_the_input_looks_like_an_item(tiny_tokenizer):
    """The instruction and template are whole-word tokens: the only bare letters/digits are items."""
    items = set("".join(members for _, members in KINDS))
    row = make_examples(1, seed=0)[0]
    prompt_tokens = tiny_tokenizer.tokenize(alpaca_prompt({**row, "input": "###"}))
    assert not [t for t in prompt_tokens if t in items]


def test_too_many_rows_is_a_clear_error():
    with pytest.raises(ValueError, match="distinct inputs"):
        make_examples(10, seed=0, kinds=(("digit", "01"), ("letter", "ab")))  # only 2*2*2! = 8


# --- scoring ----------------------------------------------------------------------------------

def test_score_is_exact_match_ignoring_surrounding_whitespace():
    assert score("B4k7", "B4k7")
    assert score("B4k7", "  B4k7\n")
    assert score(" B4k7", "B4k7")
    assert not score("B4k7", "b4k7")
    assert not score("B4k7", "B4k")
    assert not score("B4k7", "B4k77")
    assert not score("B4k7", "B4 k7")
    assert not score("B4k7", "")


# --- the command ------------------------------------------------------------------------------

def test_demo_refuses_a_folder_holding_files_it_did_not_write_before_writing_anything(tmp_path, shardtune_cli):
    """The demo follows finetune's ownership rules: a user's data/train.json is never replaced."""
    out_dir = tmp_path / "mine"
    (out_dir / "data").mkdir(parents=True)
    (out_dir / "data" / "train.json").write_text('[{"instruction": "my own", "output": "data"}]')
    before = {p: p.read_bytes() for p in out_dir.rglob("*") if p.is_file()}
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
    proc = shardtune_cli(["demo", "--output_dir", str(out_dir)], timeout=300, env=env)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "holds files shardtune did not write (data/)" in errors[0], proc.stderr[-3000:]
    assert "Choose another --output_dir." in errors[0] and "[1/6]" not in proc.stdout
    assert {p: p.read_bytes() for p in out_dir.rglob("*") if p.is_file()} == before  # nothing written



@pytest.mark.slow
def test_shardtune_demo_learns_and_writes_a_hugging_face_model(tmp_path, shardtune_cli):
    out_dir = tmp_path / "demo"
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
    proc = shardtune_cli(["demo", "--output_dir", str(out_dir)], timeout=600, env=env)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-4000:]
    summary = re.search(r"before (\d+\.\d)%\s+->\s+after (\d+\.\d)%\s+\((learned|DID NOT LEARN)\)",
                        proc.stdout)
    assert summary, proc.stdout[-4000:]
    before, after, verdict = float(summary[1]), float(summary[2]), summary[3]
    assert verdict == "learned" and before <= 5.0 and after >= 80.0, summary[0]
    assert "fine-tuning on 2 FSDP ranks" in proc.stdout  # the default demo trains sharded
    # ... and its sharded checkpoint, converted, is the same model as the recipe's HF output
    converted = re.search(r"converted checkpoint vs saved model: max \|logit difference\| (\S+) \((.*?)\)",
                          proc.stdout)
    assert converted and float(converted[1]) <= 1e-5 and converted[2] == "the same model", proc.stdout[-2000:]
    assert list((out_dir / "converted").glob("*.safetensors"))

    # the demo's folders are recorded as its own: a rerun into this folder is allowed
    assert owned(out_dir) == {"base-model/", "data/", "model/", "converted/"} and foreign_entries(out_dir) == []
    model_dir = out_dir / "model"
    assert list(model_dir.glob("*.safetensors")), sorted(p.name for p in model_dir.iterdir())
    assert (model_dir / "config.json").is_file()
    assert (model_dir / "tokenizer.json").is_file() and (model_dir / "tokenizer_config.json").is_file()
    metrics = json.loads((model_dir / "metrics.json").read_text())
    assert len(metrics["train_step_loss"]) > 100  # written by --save_metrics
