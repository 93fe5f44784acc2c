"""Bad rows (fail naming file and row, or skip and count) and the overlong policy."""

from __future__ import annotations

import json

import pytest

from shardtune.config import OverlongPolicy, ShardtuneError
from shardtune.data import load_split
from shardtune.data.rows import BadRow, check_tokenized


def _with_bad_rows(rows):
    rows = list(rows)
    rows[5] = {"instruction": "No output here."}           # missing field
    rows[7] = {"instruction": "Empty output.", "output": "  "}  # empty answer
    rows[9] = {"instruction": 42, "output": "x"}           # wrong type
    return rows


def test_bad_row_error_names_file_and_row(alpaca_cfg, alpaca_rows, tiny_tokenizer):
    cfg = alpaca_cfg(_with_bad_rows(alpaca_rows(40)))  # eval = rows 0-1, train = rows 2-39
    with pytest.raises(ShardtuneError) as err:
        load_split(cfg, tiny_tokenizer, "train")
    msg = str(err.value)
    assert "alpaca.json" in msg and "row 5 " in msg and "'output'" in msg and "--skip_bad_rows" in msg


@pytest.mark.parametrize("row,reason", [
    ({"instruction": "x", "output": ""}, "'output' is empty"),
    ({"instruction": 42, "output": "x"}, "'instruction' is a int"),
    (["not", "an", "object"], "is a list"),
])
def test_bad_row_reasons(alpaca_cfg, alpaca_rows, tiny_tokenizer, row, reason):
    rows = alpaca_rows(40)
    rows[0] = row  # row 0 is in the eval split
    with pytest.raises(ShardtuneError, match=f"row 0 .*{reason}"):
        load_split(alpaca_cfg(rows), tiny_tokenizer, "test")


def test_skip_bad_rows_counts(alpaca_cfg, alpaca_rows, tiny_tokenizer):
    cfg = alpaca_cfg(_with_bad_rows(alpaca_rows(40)), skip_bad_rows=True)
    split = load_split(cfg, tiny_tokenizer, "train")
    r = split.report
    assert (r.rows_read, r.skipped_bad, r.samples) == (38, 3, 35) and len(split.samples) == 35
    assert "3 bad rows skipped" in r.summary() and "row 5" in r.summary()


def test_csv_row_error_names_line(make_config, tiny_tokenizer, tmp_path):
    path = tmp_path / "g.csv"
    path.write_text("input,target\nshe go,She goes.\nhe run,\n")
    cfg = make_config("grammar_dataset")
    cfg.dataset_config.train_split = str(path)
    with pytest.raises(ShardtuneError, match=r"g.csv, row 1, line 3 .*'target' is empty"):
        load_split(cfg, tiny_tokenizer, "train")


def test_csv_line_numbers_count_multi_line_fields_and_blank_lines(make_config, tiny_tokenizer, tmp_path):
    path = tmp_path / "g.csv"
    path.write_text('input,target\n"she go\nto school",She goes to school.\n\nhe run,\n')
    cfg = make_config("grammar_dataset")
    cfg.dataset_config.train_split = str(path)
    with pytest.raises(ShardtuneError, match=r"g.csv, row 1, line 5 .*'target' is empty"):
        load_split(cfg, tiny_tokenizer, "train")


def test_jsonl_line_numbers_skip_blank_lines(tmp_path):
    from shardtune.data.files import read_records

    path = tmp_path / "d.jsonl"
    path.write_text('{"a": 1}\n\n\n{"a": 2}\n')
    rows, where = read_records(path, flag="--x")
    assert rows == [{"a": 1}, {"a": 2}] and where(1) == "row 1, line 4"


def _lengths(cfg, tok):
    return [len(s["input_ids"]) for s in load_split(cfg, tok, "train").samples]


def test_overlong_truncate_and_drop_are_counted(alpaca_cfg, tiny_tokenizer):
    rows = [{"instruction": "Say hi.", "output": "Hi."}] * 20
    rows[10] = {"instruction": "Say hi.", "output": " ".join(["hello there friend"] * 30)}
    full = max(_lengths(alpaca_cfg(rows), tiny_tokenizer))
    short = sorted(set(_lengths(alpaca_cfg(rows), tiny_tokenizer)))[0]
    limit = short + 20
    assert full > limit
    cfg = alpaca_cfg(rows, context_length=limit, overlong=OverlongPolicy.truncate)
    split = load_split(cfg, tiny_tokenizer, "train")
    assert split.report.truncated == 1 and split.report.dropped_overlong == 0
    long = [s for s in split.samples if len(s["input_ids"]) == limit]
    assert len(long) == 1 and len(long[0]["labels"]) == len(long[0]["attention_mask"]) == limit
    cfg = alpaca_cfg(rows, context_length=limit, overlong="drop")
    split = load_split(cfg, tiny_tokenizer, "train")
    assert split.report.dropped_overlong == 1 and split.report.truncated == 0 and len(split.samples) == 18


def test_truncation_leaving_no_trained_label_drops(alpaca_cfg, tiny_tokenizer):
    rows = [{"instruction": "Say hi.", "output": "Hi."}] * 20
    rows[3] = {"instruction": " ".join(["describe the task"] * 40), "output": "Done."}
    cfg = alpaca_cfg(rows, context_length=40, overlong="truncate")  # the prompt alone is longer
    split = load_split(cfg, tiny_tokenizer, "train")
    assert (split.report.truncated, split.report.dropped_overlong, len(split.samples)) == (0, 1, 18)


def test_empty_split_after_filtering_is_clear(alpaca_cfg, tiny_tokenizer):
    rows = [{"instruction": "Say hi.", "output": "Hi there, how are you today?"}] * 20
    cfg = alpaca_cfg(rows, context_length=8, overlong="drop")
    with pytest.raises(ShardtuneError, match=r"no usable examples.*19 rows read.*--context_length 8"):
        load_split(cfg, tiny_tokenizer, "train")


@pytest.mark.parametrize("row,reason", [
    ({"labels": [1, 2]}, "no 'input_ids'"),
    ({"input_ids": [1, 2, 3], "labels": [1, 2]}, "'labels' has 2 entries but 'input_ids' has 3"),
    ({"input_ids": [1, 2], "labels": [1, 2], "attention_mask": [1]}, "'attention_mask' has 1"),
    ({"input_ids": "hello", "labels": [1]}, "list of ints"),
    ({"input_ids": [1, 2], "labels": [-100, -100]}, "no trained label"),
])
def test_custom_row_checks(row, reason):
    with pytest.raises(BadRow, match=reason):
        check_tokenized(row)


def test_custom_bad_row_names_source_and_row(make_config, tiny_tokenizer, tmp_path):
    body = ("def get_custom_dataset(cfg, tok, split):\n"
            "    good = {'input_ids': [1, 5, 6], 'labels': [-100, 5, 6]}\n"
            "    return [good, good, {'input_ids': [1, 2], 'labels': [2]}, good]\n")
    (tmp_path / "ds.py").write_text(body)
    cfg = make_config("custom_dataset")
    cfg.dataset_config.file = str(tmp_path / "ds.py")
    with pytest.raises(ShardtuneError, match=r"ds.py:get_custom_dataset\[train\], row 2 "):
        load_split(cfg, tiny_tokenizer, "train")
    cfg.train.skip_bad_rows = True
    split = load_split(cfg, tiny_tokenizer, "train")
    assert split.report.skipped_bad == 1 and len(split.samples) == 3
    json.dumps(split.samples)  # plain lists, serialisable


def test_a_one_row_file_says_the_row_went_to_the_eval_split(tiny_model_dir, tmp_path, shardtune_cli):
    """Through the CLI: the one row is the eval split's (at least one row is held out), so the
    message says that, not "raise --context_length or use --overlong truncate"."""

    data = tmp_path / "one.json"
    data.write_text(json.dumps([{"instruction": "Say hi.", "output": "Hi."}]))
    proc = shardtune_cli(["finetune", "--model_name", str(tiny_model_dir), "--dataset", "alpaca_dataset",
                          "--alpaca_dataset.data_path", str(data), "--device", "cpu", "--output_dir", str(tmp_path / "out")],
                         timeout=300)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert "has 1 row and the first 1 is held out as the eval split" in proc.stderr, proc.stderr
    assert "--overlong" not in proc.stderr and "no usable examples" not in proc.stderr
    assert not (tmp_path / "out").exists()


def test_all_rows_cut_to_their_prompt_do_not_suggest_the_default_policy(alpaca_cfg, tiny_tokenizer):
    rows = [{"instruction": " ".join(["describe the task"] * 40), "output": "Done."}] * 20
    cfg = alpaca_cfg(rows, context_length=40, overlong="truncate")
    with pytest.raises(ShardtuneError, match=r"no usable examples.*Raise --context_length: cut to it") as info:
        load_split(cfg, tiny_tokenizer, "train")
    assert "--overlong truncate" not in str(info.value)
