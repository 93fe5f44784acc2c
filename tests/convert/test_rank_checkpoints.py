"""Round trips of checkpoints written by 2 real ranks: shardtune (FSDP2, full and LoRA) and
llama-recipes (FSDP1 SHARDED_STATE_DICT DCP and FULL_STATE_DICT .pt). Every converted tensor and
the logits are compared with what training itself saved."""

from __future__ import annotations

import subprocess
import sys
import warnings

import pytest
import torch

from shardtune.convert import convert, inspect_path


def fine_tuned(ranks, kind: str):
    return ranks / kind / "checkpoints" / "fine-tuned"


def test_shardtune_step_folder_matches_the_recipes_hf_output(ranks, tmp_path, same_weights, helpers, capsys):
    step = fine_tuned(ranks, "full") / "step-000002"
    summary = convert(step, tmp_path / "hf", verify=True)
    out = capsys.readouterr().out
    assert "found: shardtune sharded checkpoint" in out and "verify: 21 tensors identical" in out
    assert "dropped 63 optimizer state tensors" in out
    same_weights(tmp_path / "hf", ranks / "full")
    torch.testing.assert_close(helpers.hf_logits(tmp_path / "hf"), helpers.hf_logits(ranks / "full"), rtol=0, atol=0)
    assert summary["verify"]["max_abs_diff"] == 0.0
    # config, generation config and tokenizer come from the run's model_name
    from transformers import AutoTokenizer

    names = {p.name for p in (tmp_path / "hf").iterdir()}
    assert {"config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"} <= names
    assert AutoTokenizer.from_pretrained(tmp_path / "hf")("a b c")["input_ids"] == \
        AutoTokenizer.from_pretrained(ranks / "full")("a b c")["input_ids"]


def test_run_folder_takes_latest_and_dtype_converts(ranks, tmp_path, same_weights, capsys):
    convert(fine_tuned(ranks, "full"), tmp_path / "bf16", dtype="bf16", verify=True, max_shard_size="150KB")
    out = capsys.readouterr().out
    assert "took step-000002 (named by `latest`)" in out
    assert (tmp_path / "bf16" / "model.safetensors.index.json").is_file()
    assert len(list((tmp_path / "bf16").glob("model-*-of-*.safetensors"))) > 1
    same_weights(tmp_path / "bf16", ranks / "full", dtype=torch.bfloat16)
    import json

    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["dtype"] == "bfloat16"


def test_lora_checkpoint_becomes_an_adapter_or_a_merged_model(ranks, tmp_path, same_weights, helpers):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    ckpt = fine_tuned(ranks, "lora")
    convert(ckpt, tmp_path / "adapter", verify=True)
    assert (tmp_path / "adapter" / "adapter_config.json").is_file()
    same_weights(tmp_path / "adapter", ranks / "lora")  # identical to the adapter the recipe saved
    # merged: the same weights as the recipe's own --merge_lora output
    convert(ckpt, tmp_path / "merged", merge=True, verify=True)
    same_weights(tmp_path / "merged", ranks / "lora" / "merged", atol=1e-6)
    torch.testing.assert_close(helpers.hf_logits(tmp_path / "merged"), helpers.hf_logits(ranks / "lora" / "merged"),
                               rtol=0, atol=1e-5)
    # and the adapter written without --merge gives the same model through peft
    import yaml

    params = yaml.safe_load((ckpt / "step-000002" / "train_params.yaml").read_text())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        base = AutoModelForCausalLM.from_pretrained(params["train_config"]["model_name"], dtype=torch.float32)
        peft_logits = helpers.logits_of(PeftModel.from_pretrained(base, tmp_path / "adapter"))
    torch.testing.assert_close(peft_logits, helpers.hf_logits(tmp_path / "merged"), rtol=0, atol=1e-5)


def test_peft_adapter_folder_merges_into_its_base(ranks, tmp_path, same_weights, helpers):
    convert(ranks / "lora", tmp_path / "merged", merge=True, verify=True)
    same_weights(tmp_path / "merged", ranks / "lora" / "merged", atol=1e-6)
    torch.testing.assert_close(helpers.hf_logits(tmp_path / "merged"), helpers.hf_logits(ranks / "lora" / "merged"),
                               rtol=0, atol=1e-5)


def test_llama_recipes_sharded_checkpoint_matches_its_full_state_dict(ranks, tmp_path, same_weights, helpers, capsys):
    reference = torch.load(ranks / "llama-recipes-full" / "tiny-1.pt", weights_only=True)
    summary = convert(ranks / "llama-recipes", tmp_path / "hf", verify=True)
    out = capsys.readouterr().out
    assert "found: llama-recipes sharded checkpoint" in out and "train_params.yaml" in out
    assert summary["dropped"]["optimizer state tensors"] == 63
    same_weights(tmp_path / "hf", reference)
    # the logits of a model built from the config and loaded with the FULL_STATE_DICT
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(tmp_path / "hf")
    ref_model = AutoModelForCausalLM.from_config(config)
    ref_model.load_state_dict(reference)
    torch.testing.assert_close(helpers.hf_logits(tmp_path / "hf"), helpers.logits_of(ref_model), rtol=0, atol=0)


def test_llama_recipes_full_state_dict_pt_and_converter_flags(ranks, tiny_model_dir, tmp_path, same_weights, helpers):
    """``python -m shardtune.convert`` with llama-recipes' converter flags, on its FULL_STATE_DICT .pt."""
    pt = ranks / "llama-recipes-full" / "tiny-1.pt"
    proc = subprocess.run([sys.executable, "-m", "shardtune.convert", "--fsdp_checkpoint_path", str(pt),
                           "--consolidated_model_path", str(tmp_path / "hf"), "--HF_model_path_or_name",
                           str(tiny_model_dir)], capture_output=True, text=True, env=helpers.ENV, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "torch.save state dict" in proc.stdout
    same_weights(tmp_path / "hf", torch.load(pt, weights_only=True))
    # the llama-recipes DCP folder through the same flags (model from its train_params.yaml)
    convert(ranks / "llama-recipes", tmp_path / "hf2")
    same_weights(tmp_path / "hf2", tmp_path / "hf")


def test_inspect_reads_metadata_only(ranks, monkeypatch):
    from shardtune.convert import sources

    def refuse(self, keys):  # pragma: no cover - must not be called
        raise AssertionError("inspect read tensors")

    monkeypatch.setattr(sources.DcpSource, "read", refuse)
    r = inspect_path(fine_tuned(ranks, "full"))
    assert r["kind"] == "shardtune" and r["step"] == 2 and r["epoch"] == 0 and r["world_size"] == 2
    assert r["model_type"] == "llama" and r["optimizer_state"] and r["model_tensors"] == 21
    assert r["model_dtypes"] == {"float32": 21} and r["bytes"] > r["model_bytes"] > 0
    lora = inspect_path(fine_tuned(ranks, "lora") / "step-000002")
    assert lora["adapter_only"] and lora["lora_tensors"] == 8
    recipes = inspect_path(ranks / "llama-recipes")
    assert recipes["kind"] == "llama-recipes" and recipes["optimizer_state"] and recipes["optimizer_tensors"] == 63
    adapter = inspect_path(ranks / "lora")
    assert adapter["kind"] == "peft" and adapter["adapter"]["r"] == 8
    pt = inspect_path(ranks / "llama-recipes-full" / "tiny-1.pt")
    assert pt["kind"] == "torch" and not pt["optimizer_state"] and pt["model_tensors"] == 21


@pytest.mark.parametrize("as_json", [False, True])
def test_inspect_command(ranks, capsys, as_json):
    import json

    from shardtune.convert.cli import inspect_main

    inspect_main([str(fine_tuned(ranks, "full"))] + (["--json"] if as_json else []))
    out = capsys.readouterr().out
    if as_json:
        assert json.loads(out)["step"] == 2
    else:
        assert "shardtune sharded checkpoint" in out and "step:            2" in out and "optimizer state: yes" in out


def test_run_folder_whose_latest_names_a_missing_step_says_what_it_took(ranks, tmp_path, capsys):
    import shutil

    run = shutil.copytree(fine_tuned(ranks, "full"), tmp_path / "run")
    (run / "latest").write_text("step-000009\n")
    convert(run, tmp_path / "hf")
    out = capsys.readouterr().out
    assert "took step-000002 (the newest complete one: `latest` names 'step-000009', which is missing" in out
