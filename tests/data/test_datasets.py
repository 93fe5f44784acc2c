"""Tokenisation and label masks of each dataset, split rules and loading errors."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from shardtune.config import ShardtuneError
from shardtune.data import build_dataloader, load_split
from shardtune.data.prompts import GRAMMAR_PROMPT, SAMSUM_PROMPT, alpaca_prompt

IGNORE = -100


def _assert_prompt_answer(sample, n_prompt, tok):
    ids, labels = sample["input_ids"], sample["labels"]
    assert ids[0] == tok.bos_token_id
    assert ids[-1] == tok.eos_token_id and labels[-1] == tok.eos_token_id  # EOS is trained
    assert labels[:n_prompt] == [IGNORE] * n_prompt
    assert labels[n_prompt:] == ids[n_prompt:]
    assert sample["attention_mask"] == [1] * len(ids)


# --- alpaca ---

def test_alpaca_tokenisation_matches_llama_recipes(alpaca_cfg, tiny_tokenizer):
    rows = [{"instruction": "Say hi.", "output": "Hello!"},
            {"instruction": "Copy the input.", "input": "a b c", "output": "a b c"}]
    cfg = alpaca_cfg(rows * 10)
    split = load_split(cfg, tiny_tokenizer, "test")  # 20 rows -> eval = first 1
    assert len(split.samples) == 1
    row = rows[0]
    prompt = alpaca_prompt(row)
    n_prompt = len(tiny_tokenizer.encode(prompt))
    expected = tiny_tokenizer.encode(prompt + row["output"]) + [tiny_tokenizer.eos_token_id]
    sample = split.samples[0]
    assert sample["input_ids"] == expected
    _assert_prompt_answer(sample, n_prompt, tiny_tokenizer)
    train = load_split(cfg, tiny_tokenizer, "train")
    with_input = train.samples[0]  # row 1 of the file: has an input field
    assert with_input["input_ids"] == tiny_tokenizer.encode(
        alpaca_prompt(rows[1]) + "a b c") + [tiny_tokenizer.eos_token_id]
    assert "### Input:" in tiny_tokenizer.decode(with_input["input_ids"])


@pytest.mark.parametrize("n,fraction,n_eval", [(40, 0.05, 2), (60, 0.05, 3), (10, 0.05, 1), (10, 0.3, 3)])
def test_alpaca_eval_split_is_first_fraction(alpaca_cfg, alpaca_rows, tiny_tokenizer, n, fraction, n_eval):
    rows = alpaca_rows(n)
    cfg = alpaca_cfg(rows, eval_fraction=fraction)
    test = load_split(cfg, tiny_tokenizer, "test")
    train = load_split(cfg, tiny_tokenizer, "train")
    assert (len(test.samples), len(train.samples)) == (n_eval, n - n_eval)
    decoded = tiny_tokenizer.decode(train.samples[0]["input_ids"])
    assert rows[n_eval]["output"] in decoded
    assert test.report.rows_read == n_eval and train.report.source.endswith("alpaca.json")


def test_alpaca_missing_file_is_clear(make_config, tiny_tokenizer, tmp_path):
    cfg = make_config("alpaca_dataset")
    cfg.dataset_config.data_path = str(tmp_path / "nope.json")
    with pytest.raises(ShardtuneError, match=r"nope.json does not exist.*--alpaca_dataset.data_path"):
        load_split(cfg, tiny_tokenizer, "train")


# --- grammar ---

def _write_csv(path, header, rows):
    with path.open("w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return path


def test_grammar_tokenisation_and_splits(make_config, tiny_tokenizer, tmp_path):
    train = _write_csv(tmp_path / "train.csv", ["input", "target"],
                       [["she go home", "She goes home."], ["i has cat", "I have a cat."]])
    test = _write_csv(tmp_path / "test.csv", ["input", "target"], [["we is here", "We are here."]])
    cfg = make_config("grammar_dataset")
    cfg.dataset_config.train_split, cfg.dataset_config.test_split = str(train), str(test)
    split = load_split(cfg, tiny_tokenizer, "train")
    assert len(split.samples) == 2
    tok = tiny_tokenizer
    prompt_ids = tok.encode(tok.bos_token + GRAMMAR_PROMPT.format(input="she go home"), add_special_tokens=False)
    answer_ids = tok.encode("She goes home." + tok.eos_token, add_special_tokens=False)
    assert split.samples[0]["input_ids"] == prompt_ids + answer_ids
    _assert_prompt_answer(split.samples[0], len(prompt_ids), tok)
    assert len(load_split(cfg, tok, "test").samples) == 1


def test_grammar_missing_column_names_file(make_config, tiny_tokenizer, tmp_path):
    bad = _write_csv(tmp_path / "g.csv", ["input", "correction"], [["a", "b"]])
    cfg = make_config("grammar_dataset")
    cfg.dataset_config.train_split = str(bad)
    with pytest.raises(ShardtuneError, match=r"g.csv has no column.*'target'.*--grammar_dataset.train_split"):
        load_split(cfg, tiny_tokenizer, "train")


# --- samsum ---

SAMSUM_ROWS = [{"id": str(i), "dialogue": f"Ann: hi {i}\nBob: hello", "summary": f"Ann greets Bob {i}."}
               for i in range(20)]


def _write_samsum(path, rows):
    ext = path.suffix
    if ext == ".json":
        path.write_text(json.dumps(rows))
    elif ext == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif ext == ".csv":
        _write_csv(path, ["id", "dialogue", "summary"], [[r["id"], r["dialogue"], r["summary"]] for r in rows])
    else:
        pq.write_table(pa.Table.from_pylist(rows), path)
    return path


@pytest.mark.parametrize("ext", [".json", ".jsonl", ".csv", ".parquet"])
def test_samsum_single_local_file(make_config, tiny_tokenizer, tmp_path, ext):
    path = _write_samsum(tmp_path / f"samsum{ext}", SAMSUM_ROWS)
    cfg = make_config("samsum_dataset", eval_fraction=0.1)
    cfg.dataset_config.data_path = str(path)
    test = load_split(cfg, tiny_tokenizer, "test")
    train = load_split(cfg, tiny_tokenizer, "train")
    assert (len(test.samples), len(train.samples)) == (2, 18)  # first 10% held out
    tok = tiny_tokenizer
    row = SAMSUM_ROWS[0]
    prompt_ids = tok.encode(tok.bos_token + SAMSUM_PROMPT.format(dialog=row["dialogue"]), add_special_tokens=False)
    answer_ids = tok.encode(row["summary"] + tok.eos_token, add_special_tokens=False)
    assert test.samples[0]["input_ids"] == prompt_ids + answer_ids
    _assert_prompt_answer(test.samples[0], len(prompt_ids), tok)
    assert "Ann greets Bob 2." in tok.decode(train.samples[0]["input_ids"])


def test_samsum_folder_uses_split_files(make_config, tiny_tokenizer, tmp_path):
    _write_samsum(tmp_path / "train.jsonl", SAMSUM_ROWS[:15])
    _write_samsum(tmp_path / "validation.parquet", SAMSUM_ROWS[15:])
    cfg = make_config("samsum_dataset")
    cfg.dataset_config.data_path = str(tmp_path)
    assert len(load_split(cfg, tiny_tokenizer, "train").samples) == 15
    test = load_split(cfg, tiny_tokenizer, "test")
    assert len(test.samples) == 5 and test.source.endswith("validation.parquet")
    cfg.dataset_config.test_split = "test"
    with pytest.raises(ShardtuneError, match="no file for the 'test' split"):
        load_split(cfg, tiny_tokenizer, "test")


def test_samsum_offline_without_data_path_is_clear(make_config, tiny_tokenizer):
    cfg = make_config("samsum_dataset")  # conftest sets HF_HUB_OFFLINE=1
    with pytest.raises(ShardtuneError, match=r"Samsung/samsum.*--samsum_dataset.data_path"):
        load_split(cfg, tiny_tokenizer, "train")


def test_samsum_hub_without_the_datasets_package_is_refused_clearly(make_config, tiny_tokenizer, tiny_model_dir,
                                                                    tmp_path, monkeypatch, capsys):
    import sys

    from shardtune.cli import main as cli_main
    from shardtune.data import check_data_source

    monkeypatch.setitem(sys.modules, "datasets", None)  # as on a machine without it
    cfg = make_config("samsum_dataset")
    for call in (lambda: check_data_source(cfg), lambda: load_split(cfg, tiny_tokenizer, "train")):
        with pytest.raises(ShardtuneError, match=r"needs the `datasets` package.*shardtune\[hub\].*--samsum_dataset.data_path"):
            call()
    # the launcher refuses it once, before starting any rank (llama-recipes' default dataset)
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["finetune", "--nproc_per_node", "2", "--enable_fsdp", "--model_name", str(tiny_model_dir)])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.count("error:") == 1 and "`datasets` package" in err
    assert "Traceback" not in err
    # local files need no datasets package
    cfg.dataset_config.data_path = str(_write_samsum(tmp_path / "samsum.jsonl", SAMSUM_ROWS))
    check_data_source(cfg)
    assert len(load_split(cfg, tiny_tokenizer, "train").samples) == 19


# --- custom ---

CUSTOM = '''
import torch

def _rows(tokenizer, n, tag):
    out = []
    for i in range(n):
        ids = tokenizer.encode(f"{tag} example {i}")
        out.append({"input_ids": ids, "labels": [-100] + ids[1:]})
    return out

def get_custom_dataset(dataset_config, tokenizer, split):
    return _rows(tokenizer, 4 if split == "train" else 2, "default")

def myfn(dataset_config, tokenizer, split):
    return _rows(tokenizer, 3, split)

class TorchRows(torch.utils.data.Dataset):
    def __init__(self, rows): self.rows = rows
    def __len__(self): return len(self.rows)
    def __getitem__(self, i):
        r = self.rows[i]
        return {k: torch.tensor(v) for k, v in r.items()}

def torch_ds(dataset_config, tokenizer, split):
    return TorchRows(_rows(tokenizer, 5, "torch"))

def hf_ds(dataset_config, tokenizer, split):
    import datasets
    return datasets.Dataset.from_list(_rows(tokenizer, 6, "hf"))

def wrong(dataset_config, tokenizer, split):
    return {"input_ids": [1, 2]}
'''

COLLATOR = '''
import torch

class Collator:
    def __init__(self, processor): self.processor = processor
    def __call__(self, rows):
        width = max(len(r["input_ids"]) for r in rows)
        pad = lambda v, x: list(v) + [x] * (width - len(v))
        return {"input_ids": torch.tensor([pad(r["input_ids"], 0) for r in rows]),
                "labels": torch.tensor([pad(r["labels"], -100) for r in rows]),
                "from_custom_collator": torch.ones(len(rows))}

def get_data_collator(processor):
    return Collator(processor)
'''


@pytest.fixture
def custom_cfg(make_config, tmp_path):
    def build(spec: str, body: str = CUSTOM):
        (tmp_path / "my_data.py").write_text(body)
        cfg = make_config("custom_dataset")
        cfg.dataset_config.file = str(tmp_path / spec)
        return cfg

    return build


def test_custom_default_function_and_split_names(custom_cfg, tiny_tokenizer):
    cfg = custom_cfg("my_data.py")
    train, test = load_split(cfg, tiny_tokenizer, "train"), load_split(cfg, tiny_tokenizer, "test")
    assert len(train.samples) == 4 and len(test.samples) == 2 and train.collate_fn is None
    ids = tiny_tokenizer.encode("default example 0")
    assert train.samples[0] == {"input_ids": ids, "labels": [-100] + ids[1:], "attention_mask": [1] * len(ids)}


@pytest.mark.parametrize("fn,n", [("myfn", 3), ("torch_ds", 5), ("hf_ds", 6)])
def test_custom_named_function_and_return_types(custom_cfg, tiny_tokenizer, fn, n):
    if fn == "hf_ds":
        pytest.importorskip("datasets")  # optional (the hub extra)
    cfg = custom_cfg(f"my_data.py:{fn}")
    split = load_split(cfg, tiny_tokenizer, "train")
    assert len(split.samples) == n
    assert all(isinstance(v, list) and isinstance(v[0], int) for v in split.samples[0].values())
    if fn == "myfn":  # the split name passed is dataset_config.train_split
        assert "train example 0" in tiny_tokenizer.decode(split.samples[0]["input_ids"])


def test_custom_collator_comes_from_get_data_collator(custom_cfg, tiny_tokenizer):
    cfg = custom_cfg("my_data.py:myfn", CUSTOM + COLLATOR)
    split = load_split(cfg, tiny_tokenizer, "train")
    assert type(split.collate_fn.inner).__name__ == "Collator" and split.collate_fn.inner.processor is tiny_tokenizer
    loader = build_dataloader(split.samples, tokenizer=tiny_tokenizer, strategy="padding", batch_size=3,
                              context_length=512, shuffle=False, seed=0, collate_fn=split.collate_fn)
    batch = next(iter(loader))
    assert "from_custom_collator" in batch and batch["input_ids"].shape[0] == 3
    with pytest.raises(ShardtuneError, match="packing"):
        build_dataloader(split.samples, tokenizer=tiny_tokenizer, strategy="packing", batch_size=1,
                         context_length=512, shuffle=False, seed=0, collate_fn=split.collate_fn)


@pytest.mark.parametrize("spec,message", [
    ("missing.py", r"missing.py does not exist.*--custom_dataset.file"),
    ("my_data.py:nofn", r"has no function 'nofn'.*myfn"),
    ("my_data.py:wrong", r"my_data.py:wrong\(.*returned a dict"),
    ("my_data.txt", r"must name a Python file"),
])
def test_custom_errors(custom_cfg, tiny_tokenizer, spec, message):
    with pytest.raises(ShardtuneError, match=message):
        load_split(custom_cfg(spec), tiny_tokenizer, "train")


def test_custom_filler_labels_masked_with_custom_collator(custom_cfg, tiny_tokenizer):
    split = load_split(custom_cfg("my_data.py:myfn", CUSTOM + COLLATOR), tiny_tokenizer, "train")
    # 3 samples, global batch 2 x 3: rank 1's slice is empty, so it gets one label-free filler.
    loader = build_dataloader(split.samples, tokenizer=tiny_tokenizer, strategy="padding", batch_size=3,
                              context_length=512, shuffle=False, seed=0, rank=1, world_size=2,
                              drop_last=False, collate_fn=split.collate_fn)
    (batch,) = list(loader)
    assert "from_custom_collator" in batch and bool((batch["labels"] == -100).all())
    assert torch.is_tensor(batch["input_ids"])


RAW_ROWS = '''
import torch

def get_custom_dataset(dataset_config, tokenizer, split):
    return [{"text": f"row {i}"} for i in range(5)]

def get_data_collator(processor):
    def collate(rows):
        enc = [processor.encode(r["text"]) for r in rows]
        width = max(map(len, enc))
        ids = torch.tensor([e + [0] * (width - len(e)) for e in enc])
        return {"input_ids": ids, "labels": ids.clone(), "texts": [r["text"] for r in rows]}
    return collate
'''


def test_custom_rows_go_to_their_collator_unchanged(custom_cfg, tiny_tokenizer):
    split = load_split(custom_cfg("my_data.py", RAW_ROWS), tiny_tokenizer, "train")
    assert split.samples == [{"text": f"row {i}"} for i in range(5)]
    loader = build_dataloader(split.samples, tokenizer=tiny_tokenizer, strategy="padding", batch_size=2,
                              context_length=512, shuffle=False, seed=0, drop_last=False,
                              collate_fn=split.collate_fn)
    assert [b["texts"] for b in loader] == [["row 0", "row 1"], ["row 2", "row 3"], ["row 4"]]


# llama-cookbook style: the tokenizer's own BatchEncoding (a UserDict, not a dict), labels added
BATCH_ENCODING = '''
def get_custom_dataset(dataset_config, tokenizer, split):
    return [{"text": f"Say {i}." + " word" * (i % 4)} for i in range(12 if split == "train" else 4)]

def get_data_collator(tokenizer):
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    def collate(rows):
        batch = tokenizer([r["text"] for r in rows], padding=True, return_tensors="pt")
        batch["labels"] = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
        return batch
    return collate
'''


def test_custom_collator_batch_encoding_is_a_batch(custom_cfg, tiny_tokenizer):
    """Counted (pad fraction) and masked (a filler row on the rank whose slice ran short) as a dict is."""
    from transformers import BatchEncoding

    from shardtune.data import pad_fraction

    from shardtune.data.custom import load_module

    cfg = custom_cfg("my_data.py", BATCH_ENCODING)
    split = load_split(cfg, tiny_tokenizer, "test")  # 4 rows
    assert isinstance(load_module(Path(cfg.dataset_config.file)).get_data_collator(tiny_tokenizer)(split.samples),
                      BatchEncoding)
    args = dict(tokenizer=tiny_tokenizer, strategy="padding", batch_size=2, context_length=512, shuffle=False,
                seed=0, drop_last=False, collate_fn=split.collate_fn)
    filler = build_dataloader(split.samples[:1], rank=1, world_size=2, **args)  # rank 1's slice is empty
    filler.batch_sampler.set_epoch(0)
    (batch,) = list(filler)
    assert type(batch) is dict and bool((batch["labels"] == -100).all())
    loader = build_dataloader(split.samples, **args)
    loader.batch_sampler.set_epoch(0)
    assert pad_fraction(loader) > 0  # the rows differ in length


def test_custom_collator_batch_encoding_trains(tiny_model_dir, tmp_path):
    from shardtune.finetuning import main as finetune

    (tmp_path / "cookbook_text.py").write_text(BATCH_ENCODING)
    out = finetune(["--model_name", str(tiny_model_dir), "--dataset", "custom_dataset",
                    "--custom_dataset.file", str(tmp_path / "cookbook_text.py"), "--batching_strategy", "padding",
                    "--batch_size_training", "4", "--num_epochs", "1", "--device", "cpu", "--lr", "1e-2",
                    "--save_model", "False", "--output_dir", str(tmp_path / "out")])
    losses = out["train_step_loss"]
    assert len(losses) == 3 and all(math.isfinite(x) for x in losses) and losses[-1] < losses[0]
    assert out["avg_eval_loss"] is not None and math.isfinite(out["avg_eval_loss"])


WRONG_COLLATORS = '''
import torch

def get_custom_dataset(dataset_config, tokenizer, split):
    return [{"input_ids": [1, 5, 6, 7], "labels": [1, 5, 6, 7]}] * 4

def get_data_collator(tokenizer):
    def collate(rows):
        ids = torch.tensor([r["input_ids"] for r in rows])
        return RETURNED
    return collate
'''


@pytest.mark.parametrize("returned,message", [
    ("(ids, ids.clone())", r"my_data\.py \(get_data_collator\) returned a tuple; a data collator must return a "
                           r"mapping .* with input_ids and labels tensors"),
    ("{'input_ids': ids, 'attention_mask': torch.ones_like(ids)}",
     r"my_data\.py \(get_data_collator\) returned a batch without labels tensors \(it has input_ids, "
     r"attention_mask\); a data collator must return a mapping"),
])
def test_custom_collator_wrong_batches_are_named(custom_cfg, tiny_tokenizer, returned, message):
    split = load_split(custom_cfg("my_data.py", WRONG_COLLATORS.replace("RETURNED", returned)), tiny_tokenizer, "train")
    loader = build_dataloader(split.samples, tokenizer=tiny_tokenizer, strategy="padding", batch_size=2,
                              context_length=512, shuffle=False, seed=0, collate_fn=split.collate_fn)
    with pytest.raises(ShardtuneError, match=message):
        next(iter(loader))
