"""The one LoRA merge (``shardtune convert --merge``, which the recipe's ``--merge_lora`` runs on its
saved adapter): every layer kind peft adapts is folded in (a dropped or wrongly scaled layer changes
the logits), tied embeddings, a vision model's adapter, and what it refuses because no merge is exact."""

from __future__ import annotations

import json
import warnings

import pytest
import torch

from shardtune.config.errors import ShardtuneError
from shardtune.convert import convert
from shardtune.convert.mergeable import check_mergeable

IDS = torch.tensor([[1, 5, 9, 30, 2, 44, 7, 120]])


def _peft(model_dir, cls=None, seed: int = 0, **lora):
    """A PEFT model with a trained-looking adapter: every LoRA factor and saved copy perturbed."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        base = (cls or AutoModelForCausalLM).from_pretrained(model_dir, dtype=torch.float32)
        torch.manual_seed(seed)
        model = get_peft_model(base, LoraConfig(**{"r": 4, "lora_alpha": 8, **lora}))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_" in name or ".modules_to_save." in name:
                p.add_(torch.randn_like(p) * 0.05)
    return model.eval()


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS).logits.float()


def _merged(folder):
    from transformers import AutoModelForCausalLM

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


@pytest.mark.parametrize("lora", [
    dict(target_modules=["q_proj", "v_proj", "embed_tokens", "lm_head"]),
    dict(target_modules=["q_proj", "v_proj", "embed_tokens", "lm_head"], modules_to_save=["norm"]),
    # rsLoRA, a per-module alpha and rank: the scaling of each layer
    dict(target_modules=["q_proj", "v_proj", "down_proj", "embed_tokens"], modules_to_save=["lm_head"],
         use_rslora=True, alpha_pattern={"v_proj": 32}, rank_pattern={"down_proj": 2}),
])
def test_merge_folds_every_adapted_layer_kind(tiny_model_dir, tmp_path, lora):
    model = _peft(tiny_model_dir, **lora)
    model.save_pretrained(tmp_path / "adapter")
    convert(tmp_path / "adapter", tmp_path / "merged", merge=True, model=str(tiny_model_dir), log=lambda _: None)
    merged = _merged(tmp_path / "merged")
    assert not any("lora" in n or "modules_to_save" in n for n, _ in merged.named_parameters())
    torch.testing.assert_close(_logits(merged), _logits(model), rtol=0, atol=1e-5)
    base = _merged(tiny_model_dir)
    assert (_logits(base) - _logits(model)).abs().max() > 1e-2  # the adapter does change the model
    # the embeddings' and the head's LoRA each change the logits far beyond the tolerance, so a
    # merge that dropped either would fail above
    for name, module in model.named_modules():
        if name.endswith(("embed_tokens", "lm_head")) and hasattr(module, "scaling"):
            kept = module.scaling["default"]
            module.scaling["default"] = 0.0
            assert (_logits(model) - _logits(merged)).abs().max() > 1e-3, name
            module.scaling["default"] = kept


def test_merge_on_a_tied_model_keeps_the_tie(tiny_tied_model_dir, tmp_path):
    model = _peft(tiny_tied_model_dir, target_modules=["q_proj", "v_proj"])
    model.save_pretrained(tmp_path / "adapter")
    convert(tmp_path / "adapter", tmp_path / "merged", merge=True, model=str(tiny_tied_model_dir), log=lambda _: None)
    merged = _merged(tmp_path / "merged")
    assert merged.lm_head.weight is merged.model.embed_tokens.weight
    torch.testing.assert_close(_logits(merged), _logits(model), rtol=0, atol=1e-5)


@pytest.mark.parametrize("lora", [
    dict(target_modules=["q_proj", "embed_tokens"]),
    dict(target_modules=["q_proj", "lm_head"]),
    dict(target_modules=["q_proj"], modules_to_save=["lm_head"]),
    dict(target_modules=["q_proj"], modules_to_save=["embed_tokens"]),
])
def test_merge_refuses_an_adapter_on_a_tied_weight(tiny_tied_model_dir, tmp_path, lora):
    """One tensor holds both the embeddings and the head: a merge would change both, or neither."""
    model = _peft(tiny_tied_model_dir, **lora)
    model.save_pretrained(tmp_path / "adapter")
    with pytest.raises(ShardtuneError, match=r"this model ties (it )?to (model\.embed_tokens|lm_head)\.weight"):
        convert(tmp_path / "adapter", tmp_path / "merged", merge=True, model=str(tiny_tied_model_dir),
                log=lambda _: None)
    assert not (tmp_path / "merged").exists() and not list(tmp_path.glob(".merged.converting-*"))
    with pytest.raises(ShardtuneError, match="tied"):  # the recipe refuses the same before training
        check_mergeable(model)


def test_an_adapter_on_a_tied_weight_is_still_applied_unmerged(tiny_tied_model_dir, tmp_path):
    """Only writing merged weights is refused: generate / eval read the same plan and let peft apply
    the adapter, which is exact."""
    from shardtune.convert.in_memory import build_model, open_checkpoint

    model = _peft(tiny_tied_model_dir, target_modules=["q_proj", "embed_tokens"])
    model.save_pretrained(tmp_path / "adapter", save_embedding_layers=False)  # the LoRA weights only
    loaded = build_model(open_checkpoint(str(tmp_path / "adapter"), model=str(tiny_tied_model_dir)))
    torch.testing.assert_close(_logits(loaded), _logits(model), rtol=0, atol=1e-5)


def test_merge_refuses_dora_and_a_lora_bias(tiny_model_dir, tmp_path):
    for option, message in (("use_dora", "DoRA"), ("lora_bias", "LoRA bias")):
        model = _peft(tiny_model_dir, target_modules=["q_proj"], **{option: True})
        with pytest.raises(ShardtuneError, match=f"cannot merge the LoRA layer .*{message}"):
            check_mergeable(model)
        model.save_pretrained(tmp_path / option)
        with pytest.raises(ShardtuneError, match=message):
            convert(tmp_path / option, tmp_path / f"{option}-merged", merge=True, model=str(tiny_model_dir),
                    log=lambda _: None)


def test_check_mergeable_accepts_what_the_merge_folds(tiny_model_dir, tiny_tied_model_dir):
    check_mergeable(_peft(tiny_model_dir, target_modules=["q_proj", "embed_tokens", "lm_head"],
                          modules_to_save=["norm"]))
    check_mergeable(_peft(tiny_tied_model_dir, target_modules=["q_proj", "v_proj"]))


def test_vision_adapter_on_the_vision_tower_projector_and_language_model(tiny_vision_model_dir, tmp_path):
    """Mllama: LoRA on vision-tower, projector and language-model layers, merged under the names
    save_pretrained writes, gives the adapter model's logits on an image + text probe."""
    from transformers import MllamaForConditionalGeneration

    from shardtune.model.probes import probe_inputs, probe_logits

    model = _peft(tiny_vision_model_dir, cls=MllamaForConditionalGeneration,
                  target_modules=r".*(vision_model.*\.(q_proj|fc1)|multi_modal_projector|language_model.*\.v_proj)")
    adapted = {n.split(".lora_")[0] for n, _ in model.named_parameters() if ".lora_" in n}
    assert any("vision_model" in n for n in adapted) and any("multi_modal_projector" in n for n in adapted)
    model.save_pretrained(tmp_path / "adapter")
    convert(tmp_path / "adapter", tmp_path / "merged", merge=True, model=str(tiny_vision_model_dir),
            log=lambda _: None)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        merged = MllamaForConditionalGeneration.from_pretrained(tmp_path / "merged", dtype=torch.float32).eval()
    inputs = probe_inputs(merged)
    with torch.no_grad():
        torch.testing.assert_close(probe_logits(merged, inputs), probe_logits(model, inputs), rtol=0, atol=1e-5)
    cfg = json.loads((tmp_path / "merged" / "config.json").read_text())
    assert cfg["architectures"] == ["MllamaForConditionalGeneration"]


def test_in_memory_loading_refuses_what_it_would_drop(tiny_tied_model_dir, tmp_path):
    """A modules_to_save copy of a tied head has no place in the plan: generate / eval refuse it
    (naming the way round) instead of loading the model without it."""
    from shardtune.convert.in_memory import build_model, open_checkpoint

    model = _peft(tiny_tied_model_dir, target_modules=["q_proj"], modules_to_save=["lm_head"])
    model.save_pretrained(tmp_path / "adapter")
    with pytest.raises(ShardtuneError, match=r"ties to .*would drop that change.*shardtune convert"):
        build_model(open_checkpoint(str(tmp_path / "adapter"), model=str(tiny_tied_model_dir)))
