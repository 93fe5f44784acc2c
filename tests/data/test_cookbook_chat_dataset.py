"""A chat dataset written the cookbook's way (tests/data/cookbook_chat_dataset.py: dialogs through
the tokenizer's chat template, masked by the end-of-turn id 128009, a path that only runs with a
vocabulary of at least 128,000) with the real Llama 3 tokenizer and a tiny model of the real
vocabulary: trained on 2 FSDP ranks by llama-recipes' command line, then evaluated by
``shardtune eval``'s quick path. One torchrun launch."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

from shardtune.config import ShardtuneError
from shardtune.data import load_split

FILE = Path(__file__).parent / "cookbook_chat_dataset.py"
IGNORE = -100
COLOURS = ["red", "green", "blue", "yellow", "purple", "orange"]


def _dialogs(n: int, seed: int) -> list[list[dict]]:
    """Short dialogs, some with a system message and some with two exchanges."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        colour, other = rng.sample(COLOURS, 2)
        dialog = [{"role": "system", "content": "Answer with one word."}] if i % 3 == 0 else []
        dialog += [{"role": "user", "content": f"My favourite colour is {colour}. What is it?"},
                   {"role": "assistant", "content": colour.capitalize() + "."}]
        if i % 2:
            dialog += [{"role": "user", "content": f"And my friend likes {other}. What does my friend like?"},
                       {"role": "assistant", "content": other.capitalize() + "."}]
        out.append(dialog)
    return out


@pytest.fixture(scope="module")
def chat_data(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("cookbook-chat") / "dialogs.json"
    path.write_text(json.dumps({"train": _dialogs(16, 0), "validation": _dialogs(4, 1)}))
    return path


def _trained_in_turns(tok, dialog) -> int:
    """Tokens the cookbook's masks train, counted from the template's own renderings: each
    assistant turn's text and <|eot_id|> (rendering with vs without the turn), plus the "\\n\\n"
    after its header (the cookbook masks the header tokens only)."""
    n = 0
    for k, message in enumerate(dialog):
        if message["role"] == "assistant":
            before = tok.apply_chat_template(dialog[:k], add_generation_prompt=True, return_dict=False)
            after = tok.apply_chat_template(dialog[:k + 1], return_dict=False)
            assert after[:len(before)] == before
            n += len(after) - len(before) + 1
    return n


def _cfg(make_config, data: Path, spec: str = f"{FILE}:get_custom_dataset"):
    cfg = make_config("custom_dataset")
    cfg.dataset_config.file = spec
    cfg.dataset_config.data_path = str(data)
    return cfg


def test_masks_are_the_assistant_turns(make_config, llama3_tokenizer, chat_data):
    tok = llama3_tokenizer
    dialogs = json.loads(chat_data.read_text())["train"]
    split = load_split(_cfg(make_config, chat_data), tok, "train")
    assert len(split.samples) == 16
    for sample, dialog in zip(split.samples, dialogs):
        ids, labels = sample["input_ids"], sample["labels"]
        assert ids == tok.apply_chat_template(dialog, return_dict=False)
        assert sum(v != IGNORE for v in labels) == _trained_in_turns(tok, dialog)
        trained = [t for t, v in zip(ids, labels) if v != IGNORE]
        assert trained.count(128009) == sum(m["role"] == "assistant" for m in dialog)  # each answer's end of turn
        assert tok.convert_tokens_to_ids("user") not in trained  # no header or user/system text is trained


def test_the_cookbooks_transformers_4_call_is_a_clear_error(make_config, llama3_tokenizer, chat_data, tmp_path):
    """The cookbook's own file calls apply_chat_template(dialog), which transformers 5 answers with a
    BatchEncoding: its rows then hold the dict's keys instead of token ids."""
    verbatim = tmp_path / "cookbook_verbatim.py"
    verbatim.write_text(FILE.read_text().replace("apply_chat_template(dialog, return_dict=False)",
                                                 "apply_chat_template(dialog)"))
    with pytest.raises(ShardtuneError, match=r"(?s)'input_ids' must be a list of ints, but it holds a str \('input_ids'\).*"
                                             r"apply_chat_template.*return_dict=False"):
        load_split(_cfg(make_config, chat_data, f"{verbatim}:get_custom_dataset"), llama3_tokenizer, "train")


def test_trains_on_two_fsdp_ranks_and_evaluates(llama3_chat_model_dir, llama3_tokenizer, chat_data, tmp_path):
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2", "--standalone",
           "-m", "shardtune.finetuning", "--enable_fsdp", "--model_name", str(llama3_chat_model_dir),
           "--dataset", "custom_dataset", "--custom_dataset.file", f"{FILE}:get_custom_dataset",
           "--custom_dataset.data_path", str(chat_data), "--batching_strategy", "padding",
           "--batch_size_training", "2", "--num_epochs", "3", "--lr", "0.01", "--context_length", "256",
           "--output_dir", str(out), "--save_metrics", "--dist_checkpoint_root_folder", str(tmp_path / "ckpt")]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    logs = proc.stdout + proc.stderr
    assert "16 rows read -> 16 samples; 0 bad rows skipped, 0 truncated" in logs

    metrics = json.loads((out / "metrics.json").read_text())
    epochs = metrics["train_epoch_loss"]
    assert len(epochs) == 3 and all(x == x for x in epochs)  # finite
    assert epochs[2] < epochs[1] < epochs[0], epochs
    assert metrics["val_epoch_loss"][-1] < metrics["val_epoch_loss"][0]
    # the template goes out with the model
    saved = (out / "chat_template.jinja").read_text()
    assert saved == (llama3_chat_model_dir / "chat_template.jinja").read_text()

    from shardtune.eval.cli import main as eval_main

    results = eval_main([str(out), "--dataset", "custom_dataset", "--custom_dataset.file", f"{FILE}:get_custom_dataset",
                         "--custom_dataset.data_path", str(chat_data), "--split", "all", "--max_new_tokens", "3",
                         "--context_length", "256", "--output", str(tmp_path / "eval.json"), "--log_samples"])
    data = json.loads(chat_data.read_text())
    dialogs = data["validation"] + data["train"]  # --split all: test split first
    assert results["label_tokens"] == sum(_trained_in_turns(llama3_tokenizer, d) for d in dialogs)
    answers = json.loads((tmp_path / "eval.json").read_text())["answers"]
    assert len(answers) == 20 and results["exact_match"] is not None
    # a sample's question ends at its first answer's header; the reference is that answer
    assert [a["reference"].strip() for a in answers] == [d[2 if d[0]["role"] == "system" else 1]["content"]
                                                        for d in dialogs]
