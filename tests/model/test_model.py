import warnings

import pytest
from transformers import AutoModelForCausalLM

from shardtune.config import ConfigError, ShardtuneError, parse_args
from shardtune.model.family import decoder_layers, family_of
from shardtune.model.freeze import freeze_first_layers, freeze_llm_only
from shardtune.model.loading import check_model_source, load_tokenizer
from shardtune.model.peft import apply_peft


@pytest.fixture
def model(tiny_model_dir):
    return AutoModelForCausalLM.from_pretrained(tiny_model_dir)


def test_family_table(model):
    assert family_of(model).name == "llama"
    assert [type(m).__name__ for m in decoder_layers(model)] == ["LlamaDecoderLayer"] * 2


def test_freeze_first_layers_freezes_exactly_those(model):
    freeze_first_layers(model, 1)
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert frozen and all(n.startswith("model.layers.0.") for n in frozen)
    assert {n for n, p in model.named_parameters() if n.startswith("model.layers.0.")} == frozen
    with pytest.raises(ConfigError, match="more than the model's 2"):
        freeze_first_layers(model, 3)


def test_freeze_llm_only_is_for_vision_models(model):
    with pytest.raises(ConfigError, match="vision models"):
        freeze_llm_only(model)


def test_lora_trains_only_adapters(model):
    cfg = parse_args(["--use_peft", "--lora_config.r", "4"]).config
    with warnings.catch_warnings():  # no FutureWarning from peft's read of is_gradient_checkpointing
        warnings.simplefilter("error")
        peft_model = apply_peft(model, cfg)
    trainable = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert any("q_proj.lora_A" in n for n in trainable) and any("v_proj.lora_B" in n for n in trainable)


def test_llama_adapter_layers_checked(model):
    cfg = parse_args(["--use_peft", "--peft_method", "llama_adapter"]).config  # default 30 layers
    with pytest.raises(ConfigError, match="adapter_layers 30 is more than the model's 2"):
        apply_peft(model, cfg)


def test_from_peft_checkpoint_must_be_an_adapter_dir(model, tmp_path):
    cfg = parse_args(["--use_peft", "--from_peft_checkpoint", str(tmp_path)]).config
    with pytest.raises(ShardtuneError, match="not a PEFT adapter directory"):
        apply_peft(model, cfg)


def test_bad_model_paths(tmp_path):
    with pytest.raises(ShardtuneError, match="does not exist"):
        check_model_source(str(tmp_path / "nope"))
    (tmp_path / "file.bin").write_text("x")
    with pytest.raises(ShardtuneError, match="is a file"):
        check_model_source(str(tmp_path / "file.bin"))
    with pytest.raises(ShardtuneError, match="no config.json"):
        check_model_source(str(tmp_path))
    check_model_source("meta-llama/Llama-3.1-8B")  # a hub id is left to the hub client


def test_pad_token_fallback(tiny_model_dir, tmp_path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    tok.pad_token = None
    tok.save_pretrained(tmp_path)
    (tmp_path / "config.json").write_text((tiny_model_dir / "config.json").read_text())
    loaded = load_tokenizer(str(tmp_path))
    assert loaded.pad_token_id == loaded.eos_token_id


def test_fsdp_qlora_storage_must_be_the_dtype_fsdp_gathers_in():
    import torch

    from shardtune.config import ConfigError
    from shardtune.config.configs import quantization_config
    from shardtune.model.quantization import check_storage_for_fsdp

    check_storage_for_fsdp(quantization_config(quant_storage="bfloat16"), torch.bfloat16)
    with pytest.raises(ConfigError, match="--quantization_config.quant_storage bfloat16"):
        check_storage_for_fsdp(quantization_config(quant_storage="float32"), torch.bfloat16)


def test_tokenizer_name_may_be_a_folder_of_tokenizer_files_only(tiny_model_dir, tmp_path, shardtune_cli):
    """`--tokenizer_name DIR` with only what tokenizer.save_pretrained writes (no config.json), which
    AutoTokenizer loads: a 1-step run through the CLI uses it; a folder without tokenizer files is
    refused in one paragraph."""
    import json
    from pathlib import Path

    from transformers import AutoTokenizer

    tok_dir = tmp_path / "tok"
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(tok_dir)
    assert not (tok_dir / "config.json").exists()
    data = tmp_path / "data.json"
    data.write_text(json.dumps([{"instruction": f"Say {i}.", "output": f"{i}"} for i in range(8)]))

    def finetune(tokenizer: str):
        return shardtune_cli(["finetune", "--model_name", str(tiny_model_dir), "--tokenizer_name", tokenizer,
                              "--dataset", "alpaca_dataset", "--alpaca_dataset.data_path", str(data), "--device", "cpu",
                              "--batch_size_training", "2", "--batching_strategy", "padding", "--max_train_step", "1",
                              "--num_epochs", "1", "--run_validation", "False", "--save_model", "False",
                              "--output_dir", str(tmp_path / f"out-{Path(tokenizer).name}")], timeout=300)

    ok = finetune(str(tok_dir))
    assert ok.returncode == 0, ok.stderr[-3000:]
    (tmp_path / "empty").mkdir()
    bad = finetune(str(tmp_path / "empty"))
    assert bad.returncode == 2 and "holds no tokenizer" in bad.stderr and "Traceback" not in bad.stderr, bad.stderr
