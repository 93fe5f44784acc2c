"""The planner's activation estimate against the measured peak of real training steps on CPU.

The measurement is exact bookkeeping, not sampling: a ``TorchDispatchMode`` sees every tensor an
operator returns during the step (forward, loss, backward), records the bytes of each new storage
and a finaliser records when the storage dies; the peak of the live bytes, leaving out the
parameters' gradients (they are the planner's "gradients" line), is the step's activation and
temporary peak. The model is built by the recipe's own functions (loading, freezing, PEFT,
activation checkpointing) with the attention kernel the run would use (per-document SDPA for
packing), and the loss is the train loop's ``loss_sum`` with the run's ``--loss``.
"""

from __future__ import annotations

import weakref

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from shardtune.config import parse_args
from shardtune.data.collate import PaddingCollator
from shardtune.model.freeze import freeze_first_layers
from shardtune.model.loading import load_model
from shardtune.model.peft import apply_peft
from shardtune.parallel.activation_checkpointing import enable_activation_checkpointing
from shardtune.data.packing import varlen_lengths
from shardtune.plan.activations import activation_bytes, attention_for
from shardtune.plan.shapes import build_shapes, model_config
from shardtune.train.loop import loss_sum
from shardtune.train.loss import chunk_tokens_of

BATCH, SEQ = 2, 256


class LiveStorages(TorchDispatchMode):
    """Every storage an operator creates inside the mode, with when it was created and freed."""

    def __init__(self, ignore: set[int]) -> None:
        super().__init__()
        self.ignore = ignore  # storages that existed before the step (weights, buffers, the batch)
        self.live: dict[int, tuple[int, int]] = {}  # data_ptr -> (allocation id, bytes)
        self.events: list[tuple[int, int]] = []  # (allocation id, +bytes | -bytes) in order
        self.count = 0

    def _freed(self, key: int, ptr: int) -> None:
        if self.live.get(ptr, (None,))[0] == key:
            self.events.append((key, -self.live.pop(ptr)[1]))

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor):
                continue
            storage = t.untyped_storage()
            ptr = storage.data_ptr()
            if not ptr or ptr in self.ignore or ptr in self.live:  # views share their base's storage
                continue
            self.count += 1
            self.live[ptr] = (self.count, storage.nbytes())
            self.events.append((self.count, storage.nbytes()))
            weakref.finalize(storage, self._freed, self.count, ptr)
        return out

    def peak(self, leave_out: set[int]) -> int:
        current = peak = 0
        for key, nbytes in self.events:
            if key not in leave_out:
                current += nbytes
                peak = max(peak, current)
        return peak


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from shardtune.demo.tiny import build_tiny_llama

    return build_tiny_llama(tmp_path_factory.mktemp("act-llama"), hidden_size=128, num_layers=4, num_heads=4,
                            num_kv_heads=2, intermediate_size=352, max_positions=512)


def measure_step(model_dir, flags: list[str], checkpointing: bool, batching: str) -> tuple[int, int]:
    """(measured peak, planned peak) of one forward + backward, in bytes."""
    cfg = parse_args(["--model_name", str(model_dir), "--batch_size_training", str(BATCH), "--context_length",
                      str(SEQ), "--batching_strategy", batching, *flags]).config
    dtype = torch.bfloat16 if cfg.fsdp.pure_bf16 else torch.float32
    attention = attention_for(cfg, "cpu", dtype)
    torch.manual_seed(0)
    model = load_model(str(model_dir), dtype=dtype, attn=attention.kernel)
    if cfg.train.freeze_layers:
        freeze_first_layers(model, cfg.train.num_freeze_layers)
    if cfg.train.use_peft:
        model = apply_peft(model, cfg)
    if checkpointing:
        enable_activation_checkpointing(model)
    model.train()
    ids = torch.randint(0, 512, (BATCH, SEQ), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "labels": ids.clone()}
    if batching == "padding":  # the second row ends early, as the recipe's padding collator builds it
        rows = [{"input_ids": r[:n].tolist(), "labels": r[:n].tolist()} for r, n in zip(ids, [SEQ, SEQ * 3 // 4])]
        batch = PaddingCollator(pad_id=0)(rows + [{"input_ids": ids[i].tolist(), "labels": ids[i].tolist()}
                                                 for i in range(2, BATCH)])
    else:  # two packed documents per row, as the packing collator sends them
        batch["position_ids"] = torch.cat([torch.arange(SEQ // 2), torch.arange(SEQ - SEQ // 2)]).repeat(BATCH, 1)
        batch.update(varlen_lengths(batch["position_ids"]))
    tensors = [*model.parameters(), *model.buffers(), *(v for v in batch.values() if isinstance(v, torch.Tensor))]
    before = {t.untyped_storage().data_ptr() for t in tensors}
    tracker = LiveStorages(before)
    with tracker:
        loss_sum(model, batch, chunk_tokens_of(cfg.train)).backward()
    grads = {tracker.live[p.grad.untyped_storage().data_ptr()][0] for p in model.parameters()
             if p.grad is not None and p.grad.untyped_storage().data_ptr() in tracker.live}
    measured = tracker.peak(leave_out=grads)
    shapes = build_shapes(model_config(str(model_dir)), cfg)
    a = torch.empty((), dtype=dtype).element_size()
    planned = activation_bytes(shapes, batch=BATCH, seq=SEQ, a=a, attention=attention, dropout_mask=a,
                               loss_chunk_tokens=chunk_tokens_of(cfg.train))
    return measured, planned.with_ac if checkpointing else planned.without_ac


CASES = {
    "full": ([], "packing"),
    "full_padding": ([], "padding"),
    "full_plain_loss": (["--loss", "plain"], "packing"),
    "full_padding_plain_loss": (["--loss", "plain"], "padding"),
    "full_small_loss_chunks": (["--loss_chunk_tokens", "128"], "packing"),
    "lora_qv": (["--use_peft"], "packing"),
    "lora_qv_no_dropout": (["--use_peft", "--lora_config.lora_dropout", "0"], "packing"),
    "lora_all_linear": (["--use_peft", "--lora_config.target_modules", "all-linear"], "packing"),
    "frozen_layers": (["--freeze_layers", "--num_freeze_layers", "2"], "packing"),
    "pure_bf16": (["--fsdp_config.pure_bf16"], "packing"),
}


@pytest.mark.parametrize("checkpointing", [False, True], ids=["no_ac", "ac"])
@pytest.mark.parametrize("case", list(CASES))
def test_activation_estimate_within_15_percent_of_measured(model_dir, case, checkpointing):
    flags, batching = CASES[case]
    measured, planned = measure_step(model_dir, flags, checkpointing, batching)
    assert abs(planned - measured) <= 0.15 * measured, (case, checkpointing, measured, planned)


def test_checkpointing_is_measured_to_save_most_of_it(model_dir):
    """The two settings differ as planned: per-layer checkpointing keeps ~1/3 of the peak here."""
    without, _ = measure_step(model_dir, [], False, "packing")
    with_ac, _ = measure_step(model_dir, [], True, "packing")
    assert with_ac < 0.4 * without
