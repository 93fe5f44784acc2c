"""`shardtune data`: the samples it shows are the ones the recipe's training loader yields."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from shardtune import cli
from shardtune.config import parse_args
from shardtune.data import load_split
from shardtune.data.show import CLOSE, COLOUR, OPEN, RESET, SampleTokens, render
from shardtune.finetuning import attention_for, setup_data
from shardtune.model.family import family_for_config
from shardtune.model.loading import load_config, load_inputs
from shardtune.parallel.distributed import DistEnv

IGNORE = -100
VISION_CUSTOM = Path(__file__).parent / "vision_custom_dataset.py"

# A custom text dataset whose rows are raw text, tokenised only by its own collator (so the view
# must run the collator), and which prints while it loads (which must not reach --json's stdout).
RAW_TEXT_DATASET = '''
import torch

print("custom dataset: imported")


def get_custom_dataset(dataset_config, tokenizer, split):
    print("custom dataset: building rows")
    return [{"question": f"What is {i} plus {i}?", "answer": f"{2 * i}"} for i in range(8 if split == "train" else 2)]


class Collator:
    def __init__(self, tokenizer):
        self.tok = tokenizer

    def __call__(self, rows):
        ids, labels = [], []
        for r in rows:
            q = self.tok.encode(r["question"] + " ")
            a = self.tok.encode(r["answer"], add_special_tokens=False) + [self.tok.eos_token_id]
            ids.append(q + a)
            labels.append([-100] * len(q) + a)
        width = max(map(len, ids))
        return {"input_ids": torch.tensor([x + [self.tok.pad_token_id] * (width - len(x)) for x in ids]),
                "labels": torch.tensor([x + [-100] * (width - len(x)) for x in labels]),
                "attention_mask": torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x in ids])}


def get_data_collator(tokenizer):
    return Collator(tokenizer)
'''


def run_data(capfd, *args) -> tuple[int, str, str]:
    """`shardtune data ARGS` in this process: (exit code, stdout, stderr)."""
    capfd.readouterr()
    code = 0
    try:
        cli.main(["data", *map(str, args)])
    except SystemExit as exc:
        code = exc.code
    out, err = capfd.readouterr()
    return code, out, err


def recipe_loader_rows(args) -> dict[int, tuple[list[int], list[int]]]:
    """sample index -> (input_ids, labels) as the recipe's own training loader (finetuning.setup_data)
    yields them in one epoch, padding cut off."""
    cfg = parse_args([str(a) for a in args]).config
    family = family_for_config(load_config(cfg.train.model_name))
    tokenizer = load_inputs(cfg.train.model_name, cfg.train.tokenizer_name)
    env = DistEnv()
    loader, _ = setup_data(cfg, tokenizer, env, family, attention_for(cfg, env, family))
    loader.batch_sampler.set_epoch(0)
    rows = {}
    for indices, batch in zip(list(loader.batch_sampler), loader):
        for j, index in enumerate(indices):
            n = int(batch["attention_mask"][j].sum())
            assert (batch["labels"][j][n:] == IGNORE).all()  # right padding only
            rows[index] = (batch["input_ids"][j][:n].tolist(), batch["labels"][j][:n].tolist())
    return rows


def _alpaca(tmp_path: Path, n: int = 21) -> Path:
    rows = [{"instruction": f"Add {i} and {i + 1}.", "output": f"The answer is {2 * i + 1}."} for i in range(n)]
    path = tmp_path / "alpaca.json"
    path.write_text(json.dumps(rows))
    return path


@pytest.fixture
def dataset_args(tmp_path, tiny_model_dir, tiny_vision_model_dir, colour_rows):
    """dataset_args(kind) -> training flags for one dataset kind, batch size 4 (padding)."""

    def build(kind: str) -> list:
        common = ["--batching_strategy", "padding", "--batch_size_training", 4]
        if kind == "alpaca":  # 21 rows: the first is the eval split, 20 train
            return ["--model_name", tiny_model_dir, "--dataset", "alpaca_dataset",
                    "--alpaca_dataset.data_path", _alpaca(tmp_path), *common]
        if kind == "samsum":  # a local JSON-lines file; 21 rows: 1 eval, 20 train
            rows = [{"id": str(i), "dialogue": f"Ann: hi {i}\nBob: hello", "summary": f"Ann greets Bob {i}."}
                    for i in range(21)]
            (tmp_path / "samsum.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
            return ["--model_name", tiny_model_dir, "--dataset", "samsum_dataset",
                    "--samsum_dataset.data_path", tmp_path / "samsum.jsonl", *common]
        if kind == "grammar":
            lines = ["input,target"] + [f"she go to school {i},she goes to school {i}" for i in range(8)]
            (tmp_path / "grammar.csv").write_text("\n".join(lines) + "\n")
            return ["--model_name", tiny_model_dir, "--dataset", "grammar_dataset",
                    "--grammar_dataset.train_split", tmp_path / "grammar.csv",
                    "--grammar_dataset.test_split", tmp_path / "grammar.csv", *common]
        if kind == "custom_collator":
            (tmp_path / "raw_text.py").write_text(RAW_TEXT_DATASET)
            return ["--model_name", tiny_model_dir, "--dataset", "custom_dataset",
                    "--custom_dataset.file", tmp_path / "raw_text.py", *common]
        if kind == "ocrvqa":
            return ["--model_name", tiny_vision_model_dir, "--dataset", "ocrvqa_dataset",
                    "--ocrvqa_dataset.data_path", colour_rows, *common]
        assert kind == "custom_vision"  # llama-cookbook's style: raw rows + a collator that runs the processor
        return ["--model_name", tiny_vision_model_dir, "--dataset", "custom_dataset",
                "--custom_dataset.file", VISION_CUSTOM, "--custom_dataset.data_path", colour_rows, *common]

    return build


@pytest.mark.parametrize("kind", ["alpaca", "samsum", "grammar", "custom_collator", "ocrvqa", "custom_vision"])
def test_json_samples_equal_what_the_training_loader_yields(capfd, dataset_args, kind):
    args = dataset_args(kind)
    code, out, err = run_data(capfd, *args, "--show", "all", "--json")
    assert code == 0, err
    shown = [json.loads(line) for line in out.splitlines()]  # every stdout line is one JSON object
    trained = recipe_loader_rows(args)
    assert len(trained) == len(shown) >= 8  # one epoch covers every sample: each one is compared
    for index, (ids, labels) in trained.items():
        assert shown[index]["input_ids"] == ids
        assert shown[index]["labels"] == labels
    assert any(label != IGNORE for row in shown for label in row["labels"])
    assert any(label == IGNORE for row in shown for label in row["labels"])
    if kind in ("ocrvqa", "custom_vision"):  # each colour row has one image
        assert all(row["images"] == 1 for row in shown)
    else:
        assert all(set(row) == {"input_ids", "labels"} for row in shown)
    counted = sum(1 for row in shown for i, label in enumerate(row["labels"]) if i and label != IGNORE)
    assert re.search(rf"^trained tokens +{counted:,} ", err, re.M)  # the summary went to stderr


def test_split_test_shows_the_eval_split(capfd, dataset_args, tiny_tokenizer):
    args = dataset_args("alpaca")
    code, out, err = run_data(capfd, *args, "--split", "test", "--show", "all", "--json")
    assert code == 0, err
    eval_split = load_split(parse_args([str(a) for a in args]).config, tiny_tokenizer, "test")
    assert [json.loads(line) for line in out.splitlines()] == [
        {"input_ids": s["input_ids"], "labels": s["labels"]} for s in eval_split.samples]
    assert "Add 0 and 1." in tiny_tokenizer.decode(eval_split.samples[0]["input_ids"])  # the file's first row


def test_text_view_summary_and_brackets(capfd, tmp_path, tiny_model_dir, tiny_tokenizer):
    rows = [{"instruction": f"Add {i} and {i + 1}.", "output": f"The answer is {2 * i + 1}."} for i in range(12)]
    rows[3] = {"instruction": "no output"}                           # bad: skipped and counted
    rows[5]["instruction"] = " ".join(["word"] * 60)                 # its prompt alone fills the context: dropped
    rows[6]["output"] = "a long answer " * 5                         # cut to the context, keeps an answer
    path = tmp_path / "alpaca.json"
    path.write_text(json.dumps(rows))
    args = ["--model_name", tiny_model_dir, "--dataset", "alpaca_dataset", "--alpaca_dataset.data_path", path,
            "--batching_strategy", "padding", "--batch_size_training", "2", "--skip_bad_rows",
            "--context_length", "56", "--overlong", "truncate"]
    code, out, err = run_data(capfd, *args, "--show", "6")
    assert code == 0, err
    split = load_split(parse_args([str(a) for a in args]).config, tiny_tokenizer, "train")
    report = split.report
    assert (report.rows_read, report.skipped_bad) == (11, 1) and report.truncated >= 1 and report.dropped_overlong == 1
    tokens = sum(len(s["input_ids"]) for s in split.samples)
    trained = sum(1 for s in split.samples for i, v in enumerate(s["labels"]) if i and v != IGNORE)
    for name, value in (("rows read", "11"), ("samples", f"{report.samples}"), ("bad rows", "1 skipped"),
                        ("dropped", "1 "), ("truncated", f"{report.truncated} "), ("tokens", f"{tokens:,} "),
                        ("trained tokens", f"{trained:,} ")):
        assert re.search(rf"^{name} +{re.escape(value)}", out, re.M), (name, out)
    assert "\x1b[" not in out  # not a terminal: brackets, no colour
    blocks = re.findall(r"^=== sample (\d+) \((row \d+)\): (\d+) tokens, (\d+) trained ===\n(.*?)(?=\n\n===|\n?\Z)",
                        out, re.M | re.S)
    assert len(blocks) == 6
    assert [b[1] for b in blocks] == ["row 1", "row 2", "row 4", "row 6", "row 7", "row 8"]  # 3 bad, 5 dropped
    for (k, _, n_tokens, n_trained, text), sample in zip(blocks, split.samples):
        ids, labels = sample["input_ids"], sample["labels"]
        first = next(i for i, v in enumerate(labels) if i and v != IGNORE)
        assert (int(n_tokens), int(n_trained)) == (len(ids), len(ids) - first)
        assert text.replace(OPEN, "").replace(CLOSE, "") == tiny_tokenizer.decode(ids, skip_special_tokens=False)
        assert text.count(OPEN) == 1 and text.endswith(CLOSE)  # alpaca trains the answer, to its end
        assert text[text.index(OPEN) + len(OPEN):-len(CLOSE)] == tiny_tokenizer.decode(ids[first:],
                                                                                      skip_special_tokens=False)


def test_colour_marks_only_the_trained_runs(tiny_tokenizer):
    ids = tiny_tokenizer.encode("question one answer two")
    labels = [IGNORE, ids[1], IGNORE, IGNORE] + ids[4:]  # position 0 is never trained, even if labelled
    sample = SampleTokens(ids, [ids[0]] + labels[1:], [1] * len(ids))
    text = render(sample, tiny_tokenizer, colour=True)
    assert OPEN not in text and text.count(COLOUR) == 2 and text.count(RESET) == 2
    assert text.replace(COLOUR, "").replace(RESET, "") == tiny_tokenizer.decode(ids, skip_special_tokens=False)
    assert text.startswith(tiny_tokenizer.decode(ids[:1], skip_special_tokens=False) + COLOUR)


def test_a_labels_shift_by_hand_is_called_out(tiny_tokenizer):
    ids = tiny_tokenizer.encode("the answer is four")
    shifted = SampleTokens(ids, [IGNORE] + [IGNORE] + ids[3:] + [IGNORE], [1] * len(ids))
    assert shifted.unlike_input() > 0
    assert SampleTokens(ids, [IGNORE] + ids[1:], [1] * len(ids)).unlike_input() == 0


def test_bad_flags_are_finetunes_errors(capfd, dataset_args, tiny_vision_model_dir, colour_rows, tmp_path):
    finetune = [0, "", ""]
    try:
        cli.main(["finetune", "--lrr", "1e-4"])
    except SystemExit as exc:
        finetune[0] = exc.code
    finetune[1:] = capfd.readouterr()
    code, out, err = run_data(capfd, "--lrr", "1e-4")
    assert (code, out, err) == tuple(finetune) and code == 2 and "Did you mean --lr?" in err
    vision = ["--model_name", tiny_vision_model_dir, "--dataset", "ocrvqa_dataset",
              "--ocrvqa_dataset.data_path", colour_rows]
    cases = [
        ([*vision, "--batching_strategy", "packing"], "packing is not available for vision models"),
        ([*vision[:3], "alpaca_dataset"], "is a text dataset"),
        ([*dataset_args("alpaca"), "--show", "some"], "--show takes a number"),
        ([*dataset_args("alpaca"), "--split", "dev"], "--split must be train or test"),
        ([*dataset_args("alpaca"), "--alpaca_dataset.data_path", tmp_path / "missing.json"], "missing.json"),
        ([*dataset_args("alpaca"), "--batch_size_training", "64"], "gives no full batch"),
        # --run_validation (the default) loads the eval split too: a missing one is refused, as in training
        ([*dataset_args("grammar"), "--grammar_dataset.test_split", tmp_path / "val.csv"], "val.csv does not exist"),
    ]
    for args, message in cases:
        code, out, err = run_data(capfd, *args)
        assert code == 2 and message in err and "Traceback" not in err and out == "", (args, err)


def test_json_stdout_is_only_json_lines_in_a_real_process(dataset_args, shardtune_cli):
    args = dataset_args("custom_collator")
    proc = shardtune_cli(["data", *map(str, args), "--json", "--show", "5"], timeout=300)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert len(lines) == 5 and proc.stdout.endswith("\n")
    for line in lines:
        row = json.loads(line)
        assert set(row) == {"input_ids", "labels"} and len(row["input_ids"]) == len(row["labels"])
        assert all(isinstance(v, int) for v in row["input_ids"] + row["labels"])
    # the dataset file's prints and the summary are on stderr
    assert "custom dataset: building rows" in proc.stderr and "trained tokens" in proc.stderr
    assert torch.tensor(json.loads(lines[0])["labels"]).ne(IGNORE).any()


def test_no_model_weights_are_read(capfd, tmp_path, tiny_model_dir):
    import shutil

    config_only = tmp_path / "config-and-tokenizer"
    config_only.mkdir()
    for f in Path(tiny_model_dir).iterdir():
        if not f.name.endswith(".safetensors"):
            shutil.copy(f, config_only / f.name)
    code, out, err = run_data(capfd, "--model_name", config_only, "--dataset", "alpaca_dataset",
                              "--alpaca_dataset.data_path", _alpaca(tmp_path), "--batching_strategy", "padding",
                              "--show", "1", "--json")
    assert code == 0, err
    assert len(out.splitlines()) == 1
