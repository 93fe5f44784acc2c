"""``shardtune demo --dpo``: the tiny Llama learns a preference with --use_dpo, end to end."""

from __future__ import annotations

import json
import os
import re

import pytest

from shardtune.demo.preference import pair_of, preference_accuracy


def test_pairs_differ_only_in_letter_case_and_keep_the_task_fields():
    row = {"instruction": "Correct the input to standard.", "input": "7,k,B,4", "output": "B4k7"}
    pair = pair_of(row)
    assert pair["chosen"] == "B4k7" and pair["rejected"] == "b4K7" and pair["input"] == "7,k,B,4"
    assert pair["prompt"].endswith("### Response:")


def test_preference_accuracy_counts_strictly_preferred_pairs(tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    row = pair_of({"instruction": "i", "input": "x", "output": "Ab"})
    flipped = {**row, "chosen": row["rejected"], "rejected": row["chosen"]}
    # the untrained model prefers one of the two orders, and only one
    assert preference_accuracy(model, tok, [row]) + preference_accuracy(model, tok, [flipped]) == 1.0
    assert preference_accuracy(model, tok, [row, flipped]) == 0.5


@pytest.mark.slow
def test_shardtune_demo_dpo_learns_the_preference(tmp_path, shardtune_cli):
    out_dir = tmp_path / "demo"
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
    # one process: the 2-rank launch and the checkpoint conversion are the text demo's test
    proc = shardtune_cli(["demo", "--dpo", "--nproc_per_node", "1", "--output_dir", str(out_dir)], timeout=900, env=env)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    summary = re.search(r"preference accuracy on 200 held-out pairs: before (\d+\.\d)%\s+->\s+after (\d+\.\d)%\s+"
                        r"\((learned|DID NOT LEARN)\)", proc.stdout)
    assert summary, proc.stdout[-4000:]
    before, after = float(summary[1]), float(summary[2])
    assert summary[3] == "learned" and 20.0 <= before <= 80.0 and after >= 90.0, summary[0]
    metrics = json.loads((out_dir / "model" / "metrics.json").read_text())
    assert metrics["train_step_loss"][0] == pytest.approx(0.6931, abs=1e-4)
    assert metrics["train_step_reward_accuracy"][-1] > 0.9
