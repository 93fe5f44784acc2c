"""Bad input gives one clear ShardtuneError naming the file and the problem, and nothing is written."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
import torch.distributed.checkpoint as dcp

from shardtune.config.errors import ShardtuneError
from shardtune.convert import convert


class _Custom:
    """Not allowed by weights_only loading."""


def nothing_written(dst) -> None:
    assert not dst.exists()
    assert not [p for p in dst.parent.iterdir() if p.name.startswith(f".{dst.name}.")]


@pytest.fixture
def recipes_copy(ranks, tmp_path):
    """A private copy of the 2-rank llama-recipes DCP checkpoint, to damage."""
    dst = tmp_path / "ckpt"
    shutil.copytree(ranks / "llama-recipes", dst)
    return dst


def test_missing_metadata(recipes_copy, tmp_path):
    (recipes_copy / ".metadata").unlink()
    with pytest.raises(ShardtuneError, match=r"\.distcp shard files but no \.metadata") as e:
        convert(recipes_copy, tmp_path / "out")
    assert str(recipes_copy) in str(e.value)
    nothing_written(tmp_path / "out")


def test_truncated_shard(recipes_copy, tmp_path):
    shard = recipes_copy / "__1_0.distcp"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    with pytest.raises(ShardtuneError, match=r"__1_0\.distcp is truncated"):
        convert(recipes_copy, tmp_path / "out")
    nothing_written(tmp_path / "out")


def test_corrupt_shard(recipes_copy, tmp_path):
    shard = recipes_copy / "__1_0.distcp"
    shard.write_bytes(bytes(range(256)) * (shard.stat().st_size // 256) + b"\0" * (shard.stat().st_size % 256))
    with pytest.raises(ShardtuneError, match=r"Could not read tensors from .*__1_0\.distcp.*corrupt"):
        convert(recipes_copy, tmp_path / "out")
    nothing_written(tmp_path / "out")


def test_corrupt_metadata(recipes_copy, tmp_path):
    (recipes_copy / ".metadata").write_bytes(b"not a pickle")
    with pytest.raises(ShardtuneError, match=r"\.metadata cannot be read"):
        convert(recipes_copy, tmp_path / "out")
    nothing_written(tmp_path / "out")


def test_wrong_model_config_lists_shape_differences(ranks, tmp_path):
    from shardtune.demo.tiny import build_tiny_llama

    other = build_tiny_llama(tmp_path / "other", hidden_size=32)
    with pytest.raises(ShardtuneError, match=r"shapes differ \(model\.embed_tokens\.weight: checkpoint \(\d+, 64\) "
                                             r"vs model \(\d+, 32\)") as e:
        convert(ranks / "llama-recipes", tmp_path / "out", model=str(other))
    assert "Nothing was written" in str(e.value)
    nothing_written(tmp_path / "out")
    deeper = build_tiny_llama(tmp_path / "deeper", num_layers=3)
    with pytest.raises(ShardtuneError, match=r"model weights are not in the checkpoint \(model\.layers\.2\."):
        convert(ranks / "llama-recipes", tmp_path / "out", model=str(deeper))
    nothing_written(tmp_path / "out")


def test_empty_folder_and_unknown_contents(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ShardtuneError, match="is an empty folder"):
        convert(tmp_path / "empty", tmp_path / "out")
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "notes.txt").write_text("hi")
    with pytest.raises(ShardtuneError, match=r"holds no checkpoint shardtune recognises \(found: notes\.txt\)"):
        convert(tmp_path / "junk", tmp_path / "out")
    with pytest.raises(ShardtuneError, match="does not exist"):
        convert(tmp_path / "nowhere", tmp_path / "out")
    nothing_written(tmp_path / "out")


def test_a_file_where_a_folder_is_expected(ranks, tmp_path):
    with pytest.raises(ShardtuneError, match=r"one file of a DCP checkpoint; pass the folder"):
        convert(ranks / "llama-recipes" / ".metadata", tmp_path / "out")
    (tmp_path / "dst-file").write_text("x")
    with pytest.raises(ShardtuneError, match=r"dst-file is a file"):
        convert(ranks / "llama-recipes", tmp_path / "dst-file")
    with pytest.raises(ShardtuneError, match=r"train_params\.yaml is a file, but the folder holding it is expected"):
        convert(ranks / "llama-recipes" / "train_params.yaml", tmp_path / "out")
    nothing_written(tmp_path / "out")


def test_non_empty_destination_needs_overwrite(ranks, tmp_path, same_weights):
    dst = tmp_path / "out"
    dst.mkdir()
    (dst / "old.txt").write_text("keep me")
    with pytest.raises(ShardtuneError, match=r"is not empty\. Pass --overwrite"):
        convert(ranks / "llama-recipes", dst)
    assert (dst / "old.txt").read_text() == "keep me"
    convert(ranks / "llama-recipes", dst, overwrite=True)  # beside a file it did not write: kept
    assert (dst / "old.txt").read_text() == "keep me" and (dst / "model.safetensors").is_file()
    convert(ranks / "llama-recipes", dst, overwrite=True, dtype="bf16")  # again: its own files replaced
    assert (dst / "old.txt").read_text() == "keep me" and len(list(dst.glob("*.safetensors"))) == 1
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.")]
    (tmp_path / "empty").mkdir()
    convert(ranks / "llama-recipes", tmp_path / "empty")  # an empty folder is fine without --overwrite
    with pytest.raises(ShardtuneError, match="is \\(or contains\\) the source"):
        convert(ranks / "llama-recipes", ranks, overwrite=True)


def test_bad_torch_files(tiny_model_dir, tmp_path):
    good = tmp_path / "good.pt"
    torch.save({"w": torch.randn(100, 100)}, good)
    bad = tmp_path / "bad.pt"
    bad.write_bytes(good.read_bytes()[:5000])
    with pytest.raises(ShardtuneError, match=r"bad\.pt cannot be read as a torch\.save file"):
        convert(bad, tmp_path / "out", model=str(tiny_model_dir))
    torch.save({"w": torch.zeros(1), "obj": _Custom()}, tmp_path / "pickle.pt")
    with pytest.raises(ShardtuneError, match=r"pickle\.pt holds Python objects other than tensors"):
        convert(tmp_path / "pickle.pt", tmp_path / "out", model=str(tiny_model_dir))
    with pytest.raises(ShardtuneError, match=r"good\.pt .*does not say which model it belongs to.*--model"):
        convert(good, tmp_path / "out")
    (tmp_path / "many").mkdir()
    for name in ("a-1.pt", "a-2.pt"):
        shutil.copy(good, tmp_path / "many" / name)
    with pytest.raises(ShardtuneError, match=r"several torch\.save files \(a-1\.pt, a-2\.pt\)"):
        convert(tmp_path / "many", tmp_path / "out")
    nothing_written(tmp_path / "out")


def test_unexpected_tensors_are_named(tiny_model_dir, tmp_path):
    from safetensors.torch import load_file

    state = load_file(str(tiny_model_dir / "model.safetensors"))
    state["model.layers.0.mystery.weight"] = torch.zeros(3)
    torch.save(state, tmp_path / "m.pt")
    with pytest.raises(ShardtuneError, match=r"1 checkpoint tensors match no model weight \(model\.layers\.0\.mystery"):
        convert(tmp_path / "m.pt", tmp_path / "out", model=str(tiny_model_dir))
    nothing_written(tmp_path / "out")


def test_shardtune_checkpoint_problems(ranks, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(ranks / "full" / "checkpoints" / "fine-tuned", run)
    (run / "step-000002" / "COMPLETE").unlink()
    with pytest.raises(ShardtuneError, match="incomplete shardtune checkpoint"):
        convert(run / "step-000002", tmp_path / "out")
    with pytest.raises(ShardtuneError, match="has no complete checkpoint"):
        convert(run, tmp_path / "out")
    nothing_written(tmp_path / "out")


def test_peft_adapter_needs_merge_and_lora_needs_a_base(ranks, tmp_path):
    with pytest.raises(ShardtuneError, match="is a PEFT adapter.*Pass --merge"):
        convert(ranks / "lora", tmp_path / "out")
    adapter = tmp_path / "adapter"
    shutil.copytree(ranks / "lora", adapter, ignore=shutil.ignore_patterns("merged", "checkpoints"))
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = str(tmp_path / "gone")
    (adapter / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(ShardtuneError, match=r"The model .*gone' named by .*adapter_config\.json.* does not exist"):
        convert(adapter, tmp_path / "out", merge=True)
    nothing_written(tmp_path / "out")


def test_failed_verification_leaves_nothing(ranks, tmp_path, monkeypatch):
    from shardtune.convert import verify

    real = verify.reference_model

    def perturbed(conv):
        model = real(conv)
        with torch.no_grad():
            model.model.norm.weight.mul_(1.5)
        return model

    monkeypatch.setattr(verify, "reference_model", perturbed)
    with pytest.raises(ShardtuneError, match=r"--verify failed: the converted model's logits differ"):
        convert(ranks / "llama-recipes", tmp_path / "out", verify=True)
    nothing_written(tmp_path / "out")


def test_cli_prints_the_error_and_exits_2(tmp_path, capsys):
    from shardtune.cli import main

    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit) as e:
        main(["convert", str(tmp_path / "empty"), str(tmp_path / "out")])
    assert e.value.code == 2
    assert "error:" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["inspect", str(tmp_path / "empty")])
    assert e.value.code == 2
    from shardtune.convert.cli import convert_main

    with pytest.raises(ShardtuneError, match="SRC is given twice"):
        convert_main([str(tmp_path / "a"), str(tmp_path / "b"), "--fsdp_checkpoint_path", str(tmp_path / "c")])
    with pytest.raises(ShardtuneError, match="DST is missing"):
        convert_main([str(tmp_path / "a")])


def test_missing_shard_file(tmp_path, tiny_model_dir):
    dcp.save({"model": {"x": torch.zeros(3)}}, storage_writer=dcp.FileSystemWriter(str(tmp_path / "d")), no_dist=True)
    (tmp_path / "d" / "__0_0.distcp").rename(tmp_path / "elsewhere")
    (tmp_path / "d" / "train_params.yaml").write_text(f"model_name: {tiny_model_dir}\n")
    with pytest.raises(ShardtuneError, match=r"__0_0\.distcp is missing"):
        convert(tmp_path / "d", tmp_path / "out")
    nothing_written(tmp_path / "out")


def test_only_bitsandbytes_state_names_are_dropped_as_quantization_state():
    """A QLoRA checkpoint's bitsandbytes state is dropped; a weight that merely ends in a similar
    word is not (it would be reported as matching no model weight)."""
    from shardtune.convert.plan import _classify

    assert _classify("model.layers.0.mlp.up_proj.weight.absmax", 0, False).kind == "quant-state"
    assert _classify("model.layers.0.mlp.up_proj.weight.quant_state.bitsandbytes__nf4", 0, False).kind == "quant-state"
    assert _classify("model.layers.0.mlp.up_proj.SCB", 0, False).kind == "quant-state"
    assert _classify("model.layers.0.mlp.absmax", 0, False).kind == "weight"
    assert _classify("model.norm.quant_state.scale", 0, False).kind == "weight"
