"""The quick evaluation (no extra package): answers and their scoring, loss, the command, the JSON
it writes, and --run_eval_after."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from shardtune.outputs import ownership
from shardtune.config import ConfigError, ShardtuneError, describe_options, parse_args
from shardtune.data.alpaca import encode as alpaca_encode
from shardtune.data.encoding import prompt_answer
from shardtune.data.prompts import alpaca_prompt
from shardtune.demo.task import make_examples
from shardtune.eval.answers import cut_at_stop, score, stop_ids
from shardtune.eval.cli import main as eval_main
from shardtune.eval.output import WRITTEN_BY, check_output, write_results
from shardtune.eval.quick import METRICS_KEY, answer_case

TASK_ROWS = Path(__file__).resolve().parents[2] / "examples" / "eval_tasks" / "shardtune_demo" / "test.jsonl"


def quick_args(model, *extra: str) -> list[str]:
    """``shardtune eval`` arguments for the quick evaluation of the example task's 200 rows."""
    return [str(model), "--dataset", "alpaca_dataset", "--alpaca_dataset.data_path", str(TASK_ROWS),
            "--split", "all", "--context_length", "256", *extra]


# --- answers and references -------------------------------------------------------------------

def test_score_is_exact_match_ignoring_surrounding_whitespace():
    assert score("B4k7", " B4k7\n") and score("  B4k7", "B4k7")
    assert not score("B4k7", "b4k7") and not score("B4k7", "B4k77") and not score("B4k7", "B4 k7")


def test_an_answer_ends_at_the_first_stop_id():
    assert cut_at_stop([5, 6, 2, 7, 2], [2]) == [5, 6]
    assert cut_at_stop([5, 9, 6, 2], [2, 9]) == [5]
    assert cut_at_stop([5, 6], [2]) == [5, 6]


def test_stop_ids_are_the_tokenizers_eos_and_the_generation_configs(tiny_model_dir, tiny_tokenizer):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert stop_ids(model, tiny_tokenizer) == [tiny_tokenizer.eos_token_id]
    model.generation_config.eos_token_id = [tiny_tokenizer.eos_token_id, 7]  # e.g. Llama 3's <|eot_id|>
    assert stop_ids(model, tiny_tokenizer) == [tiny_tokenizer.eos_token_id, 7]


def test_an_alpaca_sample_asks_the_alpaca_prompt_and_expects_the_output(tiny_tokenizer):
    """The prompt cut from a tokenised sample is what lm-eval feeds for the same row (the alpaca
    prompt with BOS), and the reference decodes to the row's output."""
    rows = make_examples(50, seed=5) + [{"instruction": "Say hi.", "input": "", "output": "hi there"}]
    for row in rows:
        case = answer_case(alpaca_encode(row, tiny_tokenizer), tiny_tokenizer, [tiny_tokenizer.eos_token_id])
        assert case.prompt == tiny_tokenizer(alpaca_prompt(row))["input_ids"]
        assert case.reference == row["output"]


def test_a_prompt_answer_sample_asks_its_prompt(tiny_tokenizer):
    """grammar_dataset / samsum_dataset encode BOS + prompt, then answer + EOS."""
    sample = prompt_answer(tiny_tokenizer, "Correct this to standard English: i has a cat\n---\nCorrected: ",
                           "I have a cat.")
    case = answer_case(sample, tiny_tokenizer, [tiny_tokenizer.eos_token_id])
    assert case.prompt == sample["input_ids"][:len(case.prompt)] and case.reference == "I have a cat."
    assert sample["labels"][len(case.prompt)] != -100 and sample["labels"][len(case.prompt) - 1] == -100


def test_a_sample_without_trained_labels_or_tokens_is_no_question(tiny_tokenizer):
    eos = [tiny_tokenizer.eos_token_id]
    assert answer_case({"input_ids": [1, 2, 3], "labels": [-100, -100, -100]}, tiny_tokenizer, eos) is None
    assert answer_case({"images": ["a.png"], "texts": []}, tiny_tokenizer, eos) is None


# --- the command --------------------------------------------------------------------------------

def test_quick_eval_of_a_model_dir_writes_json_and_prints_a_table(trained_run, task_rows, tmp_path, capsys):
    out = tmp_path / "quick.json"
    result = eval_main(quick_args(trained_run.output, "--output", str(out), "--log_samples"))
    printed = capsys.readouterr().out
    assert "exact_match" in printed and "perplexity" in printed and str(out) in printed
    saved = json.loads(out.read_text())
    assert saved["written_by"] == WRITTEN_BY and saved["kind"] == "quick"
    assert saved["samples"] == len(task_rows) == 200
    assert [a["reference"] for a in saved["answers"]] == [r["output"] for r in task_rows]
    assert 0 < saved["exact_match"] < 1  # partly trained: the equality tests below mean something
    assert saved["exact_match"] == sum(a["correct"] for a in saved["answers"]) / 200 == result["exact_match"]
    assert saved["max_new_tokens"] == 8  # the longest answer (4 tokens) + 4, as the example task says
    assert 0 < saved["loss"] and saved["perplexity"] > 1


def test_quick_eval_of_an_adapter_dir(adapter_dir, trained_run, tmp_path):
    base = eval_main(quick_args(trained_run.output, "--output", str(tmp_path / "b.json"), "--limit", "40"))
    adapted = eval_main(quick_args(adapter_dir, "--output", str(tmp_path / "a.json"), "--limit", "40"))
    assert adapted["samples"] == base["samples"] == 40
    assert adapted["loss"] != base["loss"]  # the adapter's weights are applied


def test_a_vision_model_gets_the_loss_only(tiny_vision_model_dir, colour_rows, tmp_path):
    result = eval_main([str(tiny_vision_model_dir), "--dataset", "ocrvqa_dataset", "--ocrvqa_dataset.data_path",
                        str(colour_rows), "--output", str(tmp_path / "r.json")])
    assert result["samples"] == 4 and result["loss"] > 0 and result["label_tokens"] > 0  # 10% of 40 rows
    assert result["exact_match"] is None and "images" in result["answers_note"]


def test_loss_only_and_limit(trained_run, tmp_path):
    result = eval_main(quick_args(trained_run.output, "--output", str(tmp_path / "r.json"), "--limit", "10",
                                  "--no_answers"))
    assert result["samples"] == 10 and "exact_match" not in result and result["loss"] > 0


@pytest.mark.parametrize("argv, message", [
    (["--split", "test"], "needs a dataset"),
    (["--dataset", "alpaca_dataset", "--include_path", "."], "--include_path only applies with --tasks"),
    (["--tasks", "x", "--dataset", "alpaca_dataset"], "not an option of an lm-eval run"),
    (["--tasks", "x", "--quick"], "--quick and --tasks"),
    (["--dataset", "alpaca_dataset", "--limit", "0.5"], "--limit must be a whole number"),
])
def test_bad_option_combinations_are_refused_before_loading(tiny_model_dir, argv, message):
    with pytest.raises(ShardtuneError, match=message):
        eval_main([str(tiny_model_dir), *argv])


def test_a_missing_model_path_is_one_paragraph_and_exit_2(tmp_path, shardtune_cli):
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    proc = shardtune_cli(["eval", str(tmp_path / "nope"), "--dataset", "alpaca_dataset"], timeout=300, env=env)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "does not exist" in proc.stderr and "Traceback" not in proc.stderr


# --- where results go ---------------------------------------------------------------------------

def test_results_replace_only_a_file_shardtune_eval_wrote(tmp_path):
    mine = tmp_path / "results.json"
    mine.write_text('{"accuracy": 1}')
    with pytest.raises(ShardtuneError, match="not written by shardtune eval"):
        check_output(mine)
    ours = tmp_path / "ours.json"
    write_results(ours, {"kind": "quick"})
    check_output(ours)  # an earlier result of shardtune eval may be replaced
    assert json.loads(ours.read_text())["written_by"] == WRITTEN_BY
    assert not (tmp_path / ownership.MARKER).exists()  # a plain folder gets no marker


def test_results_go_into_a_model_dir_only_when_shardtune_owns_it(tiny_model_dir, trained_run):
    with pytest.raises(ShardtuneError, match="did not write; it is only read"):
        check_output(tiny_model_dir / "eval.json", read_from=[str(tiny_model_dir)])
    # the recipe's output directory is shardtune's: the file is recorded, so a later run into it
    # does not find a foreign file there
    path = trained_run.output / "eval-test.json"
    check_output(path, read_from=[str(trained_run.output)])
    write_results(path, {"kind": "quick"})
    assert "eval-test.json" in ownership.owned(trained_run.output)
    assert ownership.foreign_entries(trained_run.output) == []


# --- --run_eval_after ---------------------------------------------------------------------------

def test_run_eval_after_adds_the_quick_eval_of_the_saved_model_to_metrics(trained_run):
    """The recipe's last call: the saved model on the eval split, in metrics.json. Its loss is the
    recipe's validation loss of that model (same split, padding), to float precision."""
    results = trained_run.results
    metrics = json.loads((trained_run.output / "metrics.json").read_text())
    after = metrics[METRICS_KEY]
    assert after == json.loads(json.dumps(results["eval_after"]))
    assert after["split"] == "test" and after["samples"] == 100  # 5% of 2000 rows
    assert after["loss"] == pytest.approx(results["best_eval_loss"], abs=1e-5)
    assert 0 <= after["exact_match"] <= 1 and after["answered"] == 100
    assert len(metrics["train_step_loss"]) == results["steps"]  # the training curves are still there
    assert "metrics.json" in ownership.owned(trained_run.output)


def test_run_eval_after_needs_a_saved_model_and_is_listed():
    with pytest.raises(ConfigError, match="--run_eval_after evaluates the model the run saves"):
        parse_args(["--run_eval_after", "--save_model", "false"])
    assert parse_args(["--run_eval_after"]).config.train.run_eval_after
    assert "run_eval_after" in describe_options()
