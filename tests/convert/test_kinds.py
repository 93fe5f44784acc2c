"""Round trips for inputs built in-process: torch.save state dicts with FSDP / DDP / compile prefixes
and optimizer state, tied embeddings, PEFT adapters (rsLoRA, modules_to_save), a tiny Llama 3.2
Vision (Mllama) in the pre-transformers-5 layout, single-process DCP; streaming memory bounds."""

from __future__ import annotations

import json
import re
import shutil
import warnings

import pytest
import torch
import torch.distributed.checkpoint as dcp
import yaml

from shardtune.convert import convert, inspect_path


@pytest.fixture(scope="module")
def tiny_state(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _fsdp1_name(key: str) -> str:
    """What an FSDP1 + activation-checkpointing module tree calls a parameter (unflattened)."""
    key = re.sub(r"^model\.layers\.(\d+)\.", r"model.layers.\1._fsdp_wrapped_module._checkpoint_wrapped_module.", key)
    return "_fsdp_wrapped_module." + key


def test_pt_with_wrapper_prefixes_and_optimizer_state(tiny_model_dir, tiny_state, tmp_path, same_weights, capsys):
    state = {
        "model": {_fsdp1_name(k): v for k, v in tiny_state.items()},
        "optimizer": {"state": {0: {"step": torch.tensor(3.0), "exp_avg": torch.zeros(4)}},
                      "param_groups": [{"lr": 0.1, "params": [0]}]},
        "epoch": 2,
    }
    (tmp_path / "ckpt").mkdir()
    torch.save(state, tmp_path / "ckpt" / "model-2.pt")
    shutil.copy(tiny_model_dir / "config.json", tmp_path / "ckpt" / "config.json")  # found next to the file
    summary = convert(tmp_path / "ckpt", tmp_path / "hf", verify=True)
    out = capsys.readouterr().out
    assert "config.json (next to the file)" in out and "dropped 2 optimizer state tensors" in out
    assert summary["dropped"]["non-tensor entries"] == 3  # lr, params, epoch
    same_weights(tmp_path / "hf", tiny_state)


def test_pt_with_ddp_and_compile_prefixes(tiny_model_dir, tiny_state, tmp_path, same_weights):
    torch.save({f"module._orig_mod.{k}": v for k, v in tiny_state.items()}, tmp_path / "ddp.pt")
    convert(tmp_path / "ddp.pt", tmp_path / "hf", model=str(tiny_model_dir))
    same_weights(tmp_path / "hf", tiny_state)


def test_single_process_dcp_without_a_top_level_key(tiny_model_dir, tiny_state, tmp_path, same_weights):
    """dcp.save(model.state_dict()) directly: keys are HF names, no "model." container key."""
    dcp.save({k: v.clone() for k, v in tiny_state.items()}, storage_writer=dcp.FileSystemWriter(str(tmp_path / "d")),
             no_dist=True)
    summary = convert(tmp_path / "d", tmp_path / "hf", model=str(tiny_model_dir / "config.json"), verify=True)
    assert summary["kind"] == "dcp"
    same_weights(tmp_path / "hf", tiny_state)
    # config and tokenizer copied into the checkpoint folder are found there
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tiny_model_dir / name, tmp_path / "d" / name)
    convert(tmp_path / "d", tmp_path / "hf2")
    same_weights(tmp_path / "hf2", tiny_state)
    assert (tmp_path / "hf2" / "tokenizer.json").is_file()


def test_tied_embeddings_may_be_omitted_or_present(tiny_model_dir, tmp_path, same_weights, helpers, capsys):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig.from_pretrained(tiny_model_dir)
    config.tie_word_embeddings = True
    torch.manual_seed(5)
    model = LlamaForCausalLM(config)
    model.save_pretrained(tmp_path / "tied-hf")
    shutil.copy(tiny_model_dir / "tokenizer.json", tmp_path / "tied-hf")
    state = model.state_dict()
    assert "lm_head.weight" in state
    torch.save(state, tmp_path / "with_head.pt")
    convert(tmp_path / "with_head.pt", tmp_path / "a", model=str(tmp_path / "tied-hf"), verify=True)
    assert "dropped 1 tied weights" in capsys.readouterr().out
    torch.save({k: v for k, v in state.items() if k != "lm_head.weight"}, tmp_path / "without_head.pt")
    convert(tmp_path / "without_head.pt", tmp_path / "b", model=str(tmp_path / "tied-hf"), verify=True)
    same_weights(tmp_path / "a", tmp_path / "tied-hf")
    same_weights(tmp_path / "b", tmp_path / "tied-hf")
    torch.testing.assert_close(helpers.hf_logits(tmp_path / "b"), helpers.logits_of(model), rtol=0, atol=0)


@pytest.mark.parametrize("rslora", [False, True])
def test_peft_adapter_merge_equals_peft_merge_and_unload(tiny_model_dir, tmp_path, same_weights, helpers, rslora):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
        cfg = LoraConfig(r=4, lora_alpha=16, use_rslora=rslora, target_modules=["q_proj", "v_proj", "down_proj"],
                         modules_to_save=["lm_head"], init_lora_weights=False, task_type="CAUSAL_LM")
        torch.manual_seed(11)
        peft_model = get_peft_model(base, cfg)
        with torch.no_grad():
            peft_model.base_model.model.lm_head.modules_to_save["default"].weight.mul_(1.5)
        peft_model.save_pretrained(tmp_path / "adapter")
        expected_logits = helpers.logits_of(peft_model)
        merged = peft_model.merge_and_unload()
    convert(tmp_path / "adapter", tmp_path / "merged", merge=True, model=str(tiny_model_dir), verify=True)
    reference = {k: v.detach() for k, v in merged.state_dict().items()}
    same_weights(tmp_path / "merged", reference, atol=1e-6)
    torch.testing.assert_close(helpers.hf_logits(tmp_path / "merged"), expected_logits, rtol=0, atol=1e-5)


def _old_mllama_name(key: str) -> str:
    """transformers < 5 names of MllamaForConditionalGeneration weights."""
    for new, old in ((r"^model\.language_model\.", "language_model.model."), (r"^lm_head\.", "language_model.lm_head."),
                     (r"^model\.vision_model\.", "vision_model."),
                     (r"^model\.multi_modal_projector\.", "multi_modal_projector.")):
        if re.match(new, key):
            return re.sub(new, old, key)
    return key


@pytest.mark.parametrize("layout", ["old-dcp", "old-pt", "new-dcp"])
def test_tiny_mllama(tiny_mllama_dir, tmp_path, same_weights, helpers, layout, capsys):
    from transformers import MllamaForConditionalGeneration

    reference = helpers.load_weights(tiny_mllama_dir)  # save_pretrained's (pre-v5) names
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        internal = MllamaForConditionalGeneration.from_pretrained(tiny_mllama_dir, dtype=torch.float32).state_dict()
    assert "model.language_model.layers.0.mlp.up_proj.weight" in internal  # transformers 5 names
    assert {_old_mllama_name(k) for k in internal} == set(reference)
    rename = _old_mllama_name if layout.startswith("old") else (lambda k: k)
    state = {rename(k): v.clone() for k, v in internal.items()}
    if layout.endswith("dcp"):
        src = tmp_path / "ckpt"
        dcp.save({"model": state, "optim": {"state": {"x": {"exp_avg": torch.zeros(3)}}}},
                 storage_writer=dcp.FileSystemWriter(str(src)), no_dist=True)
        (src / "train_params.yaml").write_text(yaml.safe_dump({"model_name": str(tiny_mllama_dir)}))
        model = None
    else:
        src = tmp_path / "old.pt"
        torch.save(state, src)
        model = str(tiny_mllama_dir / "config.json")
    convert(src, tmp_path / "hf", model=model, verify=True)
    assert "MllamaForConditionalGeneration" in capsys.readouterr().out
    same_weights(tmp_path / "hf", reference)
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["architectures"] == ["MllamaForConditionalGeneration"]
    torch.testing.assert_close(helpers.hf_logits(tmp_path / "hf", MllamaForConditionalGeneration),
                               helpers.hf_logits(tiny_mllama_dir, MllamaForConditionalGeneration), rtol=0, atol=0)


def test_reads_one_tensor_at_a_time(tiny_model_dir, tiny_state, tmp_path, monkeypatch):
    """Bounded memory: the converter reads one tensor when the streaming writer wants it, each
    exactly once, whatever the shard size (the writer's own peak: test_safetensors_stream.py)."""
    from shardtune.convert import sources

    dcp.save({"model": {k: v.clone() for k, v in tiny_state.items()}}, no_dist=True,
             storage_writer=dcp.FileSystemWriter(str(tmp_path / "d")))
    (tmp_path / "d" / "train_params.yaml").write_text(yaml.safe_dump({"model_name": str(tiny_model_dir)}))
    reads: list[list[str]] = []
    real_read = sources.DcpSource.read

    def counting_read(self, keys):
        reads.append(list(keys))
        return real_read(self, keys)

    monkeypatch.setattr(sources.DcpSource, "read", counting_read)
    convert(tmp_path / "d", tmp_path / "hf", max_shard_size=300_000)
    assert len(list((tmp_path / "hf").glob("model-*.safetensors"))) >= 2
    assert all(len(keys) == 1 for keys in reads), [len(k) for k in reads]
    assert sorted(k for keys in reads for k in keys) == sorted(f"model.{k}" for k in tiny_state)  # each once


def test_hf_folder_is_resharded_and_inspected(tiny_model_dir, tmp_path, same_weights):
    convert(tiny_model_dir, tmp_path / "fp16", dtype="fp16", max_shard_size="200KB")
    same_weights(tmp_path / "fp16", tiny_model_dir, dtype=torch.float16)
    r = inspect_path(tmp_path / "fp16")
    assert r["kind"] == "hf" and r["model_dtypes"] == {"float16": 21} and not r["optimizer_state"]


def test_shardtune_convert_command(tiny_model_dir, tiny_state, tmp_path, same_weights):
    from shardtune.cli import main

    torch.save(tiny_state, tmp_path / "m.pt")
    main(["convert", str(tmp_path / "m.pt"), str(tmp_path / "hf"), "--model", str(tiny_model_dir), "--dtype", "fp32",
          "--verify"])
    same_weights(tmp_path / "hf", tiny_state)
