"""Generation from every kind of PATH a run leaves (HF directory, adapter, step checkpoint,
llama-recipes ``.distcp`` folder and ``.pt`` file), loaded through conversion's plan, in memory:
the same model gives the same tokens whatever form it is read from, and equals transformers' own
``generate`` on the HF directory."""

from __future__ import annotations

import json
import warnings

import pytest
import torch

from shardtune.config.errors import ShardtuneError
from shardtune.infer.generate import Sampling, generate_batch
from shardtune.infer.loading import is_checkpoint, load_for_inference
from shardtune.infer.prompts import Prompt

PROMPTS = [Prompt(text="Spell 7."), Prompt(text="a b c d e f"), Prompt(text="The quick brown fox")]
GREEDY = Sampling(max_new_tokens=8)


def _step(ranks, kind: str) -> str:
    return str(ranks / kind / "checkpoints" / "fine-tuned" / "step-000002")


def _tokens(path: str, base: str | None = None) -> list[str]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model, tok = load_for_inference(path, base, dtype=torch.float32)
    return generate_batch(model, tok, PROMPTS, GREEDY, batch_size=1)


def _logits(path: str, base: str | None = None) -> torch.Tensor:
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        model, tok = load_for_inference(path, base, dtype=torch.float32)
        return model(**tok("The quick brown fox jumps", return_tensors="pt")).logits


def test_path_kinds_are_told_apart(ranks, tiny_model_dir):
    assert not is_checkpoint(str(ranks / "full")) and not is_checkpoint(str(ranks / "lora"))
    assert is_checkpoint(_step(ranks, "full")) and is_checkpoint(str(ranks / "llama-recipes"))
    assert is_checkpoint(str(ranks / "llama-recipes-full" / "tiny-1.pt"))
    assert not is_checkpoint("meta-llama/Llama-3.1-8B")


def test_full_model_step_checkpoint_generates_as_its_hf_export_and_as_transformers(ranks):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    hf = _tokens(str(ranks / "full"))
    assert hf == _tokens(_step(ranks, "full"))
    torch.testing.assert_close(_logits(_step(ranks, "full")), _logits(str(ranks / "full")), rtol=0, atol=0)
    # transformers' own generate on the HF directory: the same new tokens
    model = AutoModelForCausalLM.from_pretrained(ranks / "full", dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(ranks / "full")
    for prompt, ours in zip(PROMPTS, hf):
        ids = tok(prompt.text, return_tensors="pt")
        with torch.no_grad():
            out = model.generate(**ids, max_new_tokens=8, do_sample=False, pad_token_id=tok.pad_token_id)
        assert tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True) == ours


def test_lora_step_checkpoint_generates_as_the_adapter_and_the_merged_model(ranks):
    adapter = _tokens(str(ranks / "lora"))
    assert _tokens(_step(ranks, "lora")) == adapter
    assert _tokens(str(ranks / "lora" / "merged")) == adapter
    from peft import PeftModel

    model, _ = load_for_inference(_step(ranks, "lora"), dtype=torch.float32)
    assert isinstance(model, PeftModel)  # the adapter applied, unmerged: what the run trained
    torch.testing.assert_close(_logits(_step(ranks, "lora")), _logits(str(ranks / "lora")), rtol=1e-5, atol=1e-5)


def test_llama_recipes_distcp_folder_and_pt_file_generate_alike(ranks, tiny_model_dir):
    distcp = _tokens(str(ranks / "llama-recipes"))  # the model comes from its train_params.yaml
    assert _tokens(str(ranks / "llama-recipes-full" / "tiny-1.pt"), str(tiny_model_dir)) == distcp
    torch.testing.assert_close(_logits(str(ranks / "llama-recipes")),
                               _logits(str(ranks / "llama-recipes-full" / "tiny-1.pt"), str(tiny_model_dir)),
                               rtol=0, atol=0)


def test_a_checkpoint_of_another_model_is_a_clear_error(ranks, tmp_path):
    from shardtune.demo.tiny import build_tiny_llama

    other = build_tiny_llama(tmp_path / "wider", hidden_size=96)
    with pytest.raises(ShardtuneError, match="shape"):
        load_for_inference(str(ranks / "llama-recipes-full" / "tiny-1.pt"), str(other))
    with pytest.raises(ShardtuneError):
        load_for_inference(str(tmp_path / "no-such-checkpoint"))


def test_generate_cli_reads_a_step_checkpoint_and_writes_jsonl(ranks, tmp_path, shardtune_cli):
    """The command as a user runs it: a prompt file in, a JSON line per prompt out, nothing else
    written; the same completions as the adapter directory gives."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("".join(p.text + "\n" for p in PROMPTS))
    out = tmp_path / "completions.jsonl"
    cmd = ["generate", _step(ranks, "lora"), "--prompt_file", str(prompts), "--max_new_tokens", "8", "--batch_size", "1",
           "--output", str(out)]
    proc = shardtune_cli(cmd, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["prompt"] for r in rows] == [p.text for p in PROMPTS]
    assert [r["completion"] for r in rows] == _tokens(str(ranks / "lora"))
    before = out.read_bytes()
    proc = shardtune_cli(cmd, timeout=300)  # never replaced silently
    assert proc.returncode != 0 and "already exists" in proc.stderr and out.read_bytes() == before
