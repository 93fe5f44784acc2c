"""Activation checkpointing policies (parallel/activation_checkpointing.py): every policy gives the
losses and gradients of no checkpointing, and recomputes what it says (counted matmuls in the
backward). Under FSDP on 2 ranks: tests/parallel/test_fsdp_speed.py."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import AutoModelForCausalLM

from shardtune.config import ConfigError, parse_args
from shardtune.config.configs import CheckpointingPolicy
from shardtune.parallel.activation_checkpointing import OffloadActivations, enable_activation_checkpointing
from shardtune.train.loop import IGNORE_INDEX, loss_sum

MATMULS = {torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.bmm.default}


class CountMatmuls(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += func in MATMULS
        return func(*args, **(kwargs or {}))


@pytest.fixture(scope="module")
def four_layers(tmp_path_factory):
    from shardtune.demo.tiny import build_tiny_llama

    return build_tiny_llama(tmp_path_factory.mktemp("tiny-4-layers"), seed=0, num_layers=4)


def batch(vocab: int) -> dict:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(4, vocab, (2, 24), generator=g)
    labels = ids.clone()
    labels[:, :4] = IGNORE_INDEX
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


def run(model, data) -> tuple[float, dict, int, int]:
    """loss, gradients, matmuls in the forward, matmuls in the backward."""
    model.train()
    model.zero_grad(set_to_none=True)
    with CountMatmuls() as forward:
        value = loss_sum(model, data)
    with CountMatmuls() as backward:
        value.backward()
    return float(value.detach()), {n: p.grad.clone() for n, p in model.named_parameters()}, forward.count, backward.count


def checkpointed(path, policy=None, every_k=1):
    model = AutoModelForCausalLM.from_pretrained(path)
    if policy is not None:
        n = enable_activation_checkpointing(model, policy, every_k)
        return model, n
    return model, 0


def test_every_policy_gives_the_losses_and_gradients_of_none(four_layers):
    none, _ = checkpointed(four_layers)
    data = batch(none.config.vocab_size)
    loss, grads, fwd, bwd = run(none, data)
    # q, k, v, o, gate, up: the recompute stops once it has every tensor the backward needs, and
    # down_proj's output is not one of them
    per_layer = 6
    results = {}
    for policy, k in ((CheckpointingPolicy.full, 1), (CheckpointingPolicy.every_k, 2),
                      (CheckpointingPolicy.every_k, 3), (CheckpointingPolicy.ops, 1)):
        model, n = checkpointed(four_layers, policy, k)
        got = run(model, data)
        results[(policy.value, k)] = (n, got[3] - bwd)
        assert got[0] == pytest.approx(loss, rel=1e-6), (policy, k)
        for name, grad in grads.items():
            torch.testing.assert_close(got[1][name], grad, rtol=1e-5, atol=1e-6, msg=lambda m, name=name: f"{name}: {m}")
        assert got[2] == fwd
    # what each recomputes in the backward: full every layer's matmuls, every_k those of layers
    # 0, k, 2k, ... (k=2: 0 and 2; k=3: 0 and 3), ops none (their outputs are saved)
    assert results == {("full", 1): (4, 4 * per_layer), ("every_k", 2): (2, 2 * per_layer),
                       ("every_k", 3): (2, 2 * per_layer), ("ops", 1): (4, 0)}


def test_vision_model_towers_under_the_ops_and_every_k_policies(tiny_vision_model_dir):
    """Mllama's vision encoder layers are checkpointed by torch's composable checkpoint, with the
    ops policy's context as well."""
    from transformers import MllamaForConditionalGeneration

    from shardtune.model.family import decoder_layers
    from shardtune.model.probes import probe_inputs

    def load():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return MllamaForConditionalGeneration.from_pretrained(tiny_vision_model_dir)

    reference = load()
    data = probe_inputs(reference, tokens=12)
    data["labels"] = data["input_ids"].clone()
    loss, grads, _, _ = run(reference, data)
    for policy, k in ((CheckpointingPolicy.ops, 1), (CheckpointingPolicy.every_k, 2)):
        model = load()
        n = enable_activation_checkpointing(model, policy, k)
        assert n == (len(decoder_layers(model)) + k - 1) // k
        got = run(model, data)
        assert got[0] == pytest.approx(loss, rel=1e-6)
        for name, grad in grads.items():
            torch.testing.assert_close(got[1][name], grad, rtol=1e-5, atol=1e-6, msg=lambda m, name=name: f"{name}: {m}")


def test_offload_keeps_cpu_tensors_and_weights_where_they_are(tiny_model_dir):
    """On CPU nothing moves (the pack hook returns the tensor itself), so the results are the plain
    ones; the GPU path is in test_gpu_speed.py."""
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    data = batch(model.config.vocab_size)
    loss, grads, _, _ = run(model, data)
    with OffloadActivations(min_bytes=0):
        got = run(model, data)
    assert got[0] == loss


@pytest.mark.parametrize("args, message", [
    (["--activation_checkpointing_policy", "ops"], "applies under --enable_fsdp"),
    (["--enable_fsdp", "--fsdp_config.fsdp_activation_checkpointing", "false", "--activation_checkpointing_policy",
      "every_k"], "is off"),
    (["--enable_fsdp", "--activation_checkpointing_every_k", "3"], "only applies with --activation_checkpointing_policy"),
    (["--enable_fsdp", "--activation_checkpointing_policy", "every_k", "--activation_checkpointing_every_k", "0"],
     "at least 1"),
    (["--enable_fsdp", "--activation_offload", "--device", "cpu"], "nothing to offload"),
    (["--activation_offload"], "applies under --enable_fsdp"),
])
def test_bad_combinations_are_refused(args, message):
    with pytest.raises(ConfigError, match=message):
        parse_args(["--model_name", "m", *args])


def test_offload_refused_on_a_cpu_run():
    """--device auto resolves to the CPU here: refused when the device is known, before loading."""
    from shardtune.config import ShardtuneError
    from shardtune.parallel.activation_checkpointing import check_activation_offload

    with pytest.raises(ShardtuneError, match="nothing to offload"):
        check_activation_offload(torch.device("cpu"))
