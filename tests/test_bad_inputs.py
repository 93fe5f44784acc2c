"""Bad inputs through the real CLI (processes of their own, forked from the suite's pre-imported
``python -m shardtune``: conftest's ``shardtune_cli``): each one exits with its code and one
paragraph of explanation, no traceback, and changes no file outside the run's own outputs.

All cases share one folder of inputs (models, data, an adapter); every case writes
only under ``outputs/<case>``; the inputs are compared byte for byte before and after.
"""

from __future__ import annotations

import json
import os
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def _snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and "outputs" not in p.relative_to(root).parts}


def _truncate(path: Path) -> None:
    with path.open("r+b") as f:
        f.truncate(path.stat().st_size // 2)


def _inputs(root: Path, tiny_model_dir: Path) -> dict[str, str]:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from shardtune.demo.tiny import build_tiny_llama

    model = shutil.copytree(tiny_model_dir, root / "model")
    damaged = shutil.copytree(tiny_model_dir, root / "damaged-model")
    _truncate(damaged / "model.safetensors")
    other_size = build_tiny_llama(root / "other-size-model", hidden_size=32)
    adapter = root / "adapter"
    get_peft_model(AutoModelForCausalLM.from_pretrained(model), LoraConfig(r=4, target_modules=["q_proj"])) \
        .save_pretrained(adapter)
    rows = [{"instruction": f"Say {i}.", "output": f"{i}"} for i in range(40)]
    (root / "good.json").write_text(json.dumps(rows))
    (root / "latin1.json").write_bytes(json.dumps(rows[:5]).encode()[:-2] + b', {"instruction": "caf\xe9", "output": "x"}]')
    (root / "latin1.jsonl").write_bytes(b'{"instruction": "a", "output": "b"}\n{"instruction": "\xff", "output": "b"}\n')
    (root / "latin1.csv").write_bytes(b"input,target\nhe go,He goes.\nna\xefve,Naive.\n")
    (root / "null.json").write_text(json.dumps(rows[:3] + [{"instruction": None, "output": "x"}] + rows[3:]))
    foreign = root / "someone-elses-dir"
    foreign.mkdir()
    (foreign / "special_tokens_map.json").write_text('{"eos_token": "<|other|>"}')
    (root / "a-file").write_text("not a directory")
    (root / "bad-prompts.jsonl").write_text('{"prompt": "fine"}\n{"question": "no prompt key"}\n')
    (root / "not-a-checkpoint").mkdir()
    (root / "not-a-checkpoint" / "notes.txt").write_text("hello")
    # custom dataset files whose collators return the wrong thing; under outputs/ (not compared)
    # because importing them writes their __pycache__ beside them
    custom = root / "outputs" / "custom-datasets"
    custom.mkdir(parents=True)
    for name, returned in {"tuple_collator": "ids, ids.clone()",
                           "no_labels_collator": "{'input_ids': ids, 'attention_mask': torch.ones_like(ids)}"}.items():
        (custom / f"{name}.py").write_text(
            "import torch\n"
            "def get_custom_dataset(dataset_config, tokenizer, split):\n"
            "    return [{'input_ids': [1, 5, 6, 7], 'labels': [1, 5, 6, 7]}] * 8\n"
            "def get_data_collator(tokenizer):\n"
            "    def collate(rows):\n"
            "        ids = torch.tensor([r['input_ids'] for r in rows])\n"
            f"        return {returned}\n"
            "    return collate\n")
    return {"model": str(model), "damaged": str(damaged), "other_size": str(other_size), "adapter": str(adapter),
            "root": str(root)}


def _cases(p: dict[str, str]) -> dict[str, tuple[list[str], int, str]]:
    """name -> (shardtune arguments, exit code, a regex the message must contain)."""
    r = p["root"]

    def ft(name: str, *extra: str, data: str = "good.json", model: str = p["model"],
           out: str | None = None) -> list[str]:
        return ["finetune", "--model_name", model, "--dataset", "alpaca_dataset",
                "--alpaca_dataset.data_path", f"{r}/{data}", "--device", "cpu", "--batching_strategy", "padding",
                "--output_dir", out or f"{r}/outputs/{name}", "--num_epochs", "1", "--max_train_step", "1", *extra]

    gen = ["generate", p["model"], "--prompt", "hi", "--device", "cpu"]
    return {
        "lr_inf": (ft("lr_inf", "--lr", "inf"), 2, r"--lr must be a finite number"),
        "gamma_nan": (ft("gamma_nan", "--gamma", "nan"), 2, r"--gamma must be a finite number"),
        "gamma_negative": (ft("gamma_negative", "--gamma", "-1"), 2, r"--gamma must be positive"),
        "clip_nan": (ft("clip_nan", "--gradient_clipping_threshold", "nan"), 2, r"must be a finite number"),
        "weight_decay_nan": (ft("weight_decay_nan", "--weight_decay", "nan"), 2, r"--weight_decay must be a finite number"),
        "output_is_the_model": (ft("x", "--overwrite_output_dir", out=p["model"]), 2, r"is the path --model_name reads from"),
        # shardtune never writes into or around the folders it reads from
        "output_inside_the_model": (ft("x", out=f"{p['model']}/out"), 2,
                                    r"--output_dir '.*model/out' is inside the path --model_name reads from"),
        "output_inside_the_tokenizer": (ft("x", "--tokenizer_name", p["other_size"], out=f"{p['other_size']}/out"), 2,
                                        r"is inside the path --tokenizer_name reads from"),
        "output_inside_the_adapter": (ft("x", "--use_peft", "--from_peft_checkpoint", p["adapter"],
                                         out=f"{p['adapter']}/out"), 2,
                                      r"is inside the path --from_peft_checkpoint reads from"),
        "output_holds_foreign_files": (ft("x", out=f"{r}/someone-elses-dir"), 2,
                                       r"holds files shardtune did not write \(special_tokens_map\.json\).*--overwrite_output_dir"),
        "output_is_a_file": (ft("x", out=f"{r}/a-file"), 2, r"is a file"),
        "json_not_utf8": (ft("json_not_utf8", data="latin1.json"), 2, r"latin1\.json is not UTF-8 text: byte 0xe9 at line 1, column \d+ \(byte offset \d+"),
        "jsonl_not_utf8": (ft("jsonl_not_utf8", data="latin1.jsonl"), 2, r"latin1\.jsonl is not UTF-8 text: byte 0xff at line 2"),
        "csv_not_utf8": (["finetune", "--model_name", p["model"], "--dataset", "grammar_dataset",
                          "--grammar_dataset.train_split", f"{r}/latin1.csv", "--grammar_dataset.test_split",
                          f"{r}/latin1.csv", "--device", "cpu", "--output_dir", f"{r}/outputs/csv"], 2,
                         r"latin1\.csv is not UTF-8 text: byte 0xef at line 3"),
        "null_field": (ft("null_field", data="null.json"), 2, r"field 'instruction' is null"),
        "damaged_model": (ft("damaged_model", model=p["damaged"]), 2,
                          r"damaged-model/model\.safetensors is damaged"),
        "wrong_model_name": (["finetune", "--model_name", f"{r}/no-such-model", "--output_dir", f"{r}/outputs/w"], 2,
                             r"--model_name '.*no-such-model' does not exist"),
        "resume_from_not_a_checkpoint": (ft("resume_from", "--resume_from", f"{r}/not-a-checkpoint"), 2,
                                         r"is not a shardtune checkpoint"),
        "generate_negative_temperature": (gen + ["--temperature", "-1"], 2, r"--temperature must be 0"),
        "generate_top_p_2": (gen + ["--top_p", "2", "--temperature", "0.7"], 2, r"--top_p must be above 0 and at most 1"),
        "generate_zero_tokens": (gen + ["--max_new_tokens", "0"], 2, r"--max_new_tokens must be at least 1"),
        "generate_cuda_without_gpu": (["generate", p["model"], "--prompt", "hi", "--device", "cuda"], 2,
                                      r"no CUDA GPU is visible"),
        "generate_damaged_model": (["generate", p["damaged"], "--prompt", "hi", "--device", "cpu"], 2,
                                   r"model\.safetensors is damaged"),
        "generate_adapter_other_base": (["generate", p["adapter"], "--base", p["other_size"], "--prompt", "hi",
                                         "--device", "cpu"], 2, r"does not fit the base model"),
        "generate_missing_prompt_file": (["generate", p["model"], "--prompt_file", f"{r}/no-prompts.txt"], 2,
                                         r"--prompt_file .*no-prompts\.txt' does not exist"),
        "generate_bad_jsonl_row": (["generate", p["model"], "--prompt_file", f"{r}/bad-prompts.jsonl"], 2,
                                   r"bad-prompts\.jsonl, line 2: each row must be an object with either"),
        "generate_output_exists": (gen + ["--output", f"{r}/good.json"], 2, r"good\.json' already exists"),
        "generate_not_a_checkpoint": (["generate", f"{r}/not-a-checkpoint", "--prompt", "hi"], 2,
                                      r"not-a-checkpoint"),
        "chat_without_template": (["chat", p["model"]], 2, r"needs a tokenizer with a chat template"),
        # convert reads --model's weights when it merges an adapter into it
        "convert_damaged_model": (["convert", p["adapter"], f"{r}/outputs/merged", "--merge", "--model", p["damaged"]],
                                  2, r"damaged-model/model\.safetensors .*truncated or corrupt"),
        # a destination inside the source would be deleted with it (--keep_last_n prunes step folders)
        "convert_into_its_source": (["convert", p["adapter"], f"{p['adapter']}/merged", "--merge", "--model",
                                     p["model"]], 2,
                                    r"destination .*adapter/merged is inside the source"),
        # nor a destination around the source (its clean-up would take the source with it)
        "convert_around_its_source": (["convert", p["adapter"], r, "--merge", "--model", p["model"]], 2,
                                      r"destination .* is \(or contains\) the source .*adapter"),
        "two_ranks_output_inside_the_model": (["finetune", "--nproc_per_node", "2", "--enable_fsdp",
                                               *ft("x", out=f"{p['model']}/out")[1:]], 2,
                                              r"is inside the path --model_name reads from"),
        # a custom collator's batch is checked where it is made, not met as a KeyError in the loop
        "collator_returns_tuple": (["finetune", "--model_name", p["model"], "--dataset", "custom_dataset",
                                    "--custom_dataset.file", f"{r}/outputs/custom-datasets/tuple_collator.py",
                                    "--device", "cpu", "--batching_strategy", "padding", "--output_dir", f"{r}/outputs/tuple"], 2,
                                   r"tuple_collator\.py \(get_data_collator\) returned a tuple; a data collator "
                                   r"must return a mapping .* with input_ids and labels tensors"),
        "collator_without_labels": (["finetune", "--model_name", p["model"], "--dataset", "custom_dataset",
                                     "--custom_dataset.file", f"{r}/outputs/custom-datasets/no_labels_collator.py",
                                     "--device", "cpu", "--batching_strategy", "padding",
                                     "--output_dir", f"{r}/outputs/no-labels"], 2,
                                    r"no_labels_collator\.py \(get_data_collator\) returned a batch without "
                                    r"labels tensors \(it has input_ids, attention_mask\)"),
        "two_ranks_not_utf8": (["finetune", "--nproc_per_node", "2", "--enable_fsdp", *ft("two_ranks", data="latin1.json")[1:]], 2,
                               r"latin1\.json is not UTF-8 text"),
    }


@pytest.fixture(scope="module")
def outcomes(tiny_model_dir, tmp_path_factory, shardtune_cli):
    root = tmp_path_factory.mktemp("bad-inputs")
    paths = _inputs(root, tiny_model_dir)
    cases = _cases(paths)
    if torch.cuda.is_available():  # this case is about a machine without a GPU
        del cases["generate_cuda_without_gpu"]
    before = _snapshot(root)

    def run(item):
        name, (args, _, _) = item
        return name, shardtune_cli(args, timeout=300, env=ENV)

    with ThreadPoolExecutor(2) as pool:
        results = dict(pool.map(run, cases.items()))
    return {"cases": cases, "results": results, "inputs_unchanged": _snapshot(root) == before}


CASE_NAMES = list(_cases({"model": "", "damaged": "", "other_size": "", "adapter": "", "root": ""}))


@pytest.mark.parametrize("name", CASE_NAMES)
def test_bad_input_is_one_clear_paragraph(outcomes, name):
    import re

    if name not in outcomes["cases"]:
        pytest.skip("needs a machine without a GPU")
    _, code, pattern = outcomes["cases"][name]
    proc = outcomes["results"][name]
    err = proc.stderr
    assert proc.returncode == code, (proc.returncode, err[-3000:])
    assert "Traceback" not in err, err[-3000:]
    errors = [line for line in err.splitlines() if line.startswith(("error:", "[rank"))]
    assert len(errors) == 1, err[-3000:]  # one paragraph, from one rank
    assert re.search(pattern, errors[0]), errors[0]


def test_no_input_file_changed(outcomes):
    assert outcomes["inputs_unchanged"]
