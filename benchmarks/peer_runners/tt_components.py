"""Components named by ``_component_`` in the torchtune runner's config (torchtune instantiates
them by dotted path, ``benchmarks.peer_runners.tt_components.<name>``, importable because the
runner starts in the repository root)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


class PlanTokenizer:
    """The recipe asks its tokenizer only for ``pad_id`` (padding) and ``max_seq_len``; the
    plan's rows are already token ids."""

    def __init__(self, pad_id: int, max_seq_len: int) -> None:
        self.pad_id = pad_id
        self.max_seq_len = max_seq_len


class PlanDataset:
    """The plan's rows in training order, as torchtune's datasets yield them: ``tokens`` and
    ``labels`` (SFTDataset) or, packed, also ``input_pos`` and ``seq_lens`` (PackedDataset)."""

    def __init__(self, plan_path: str, packed: bool) -> None:
        import torch

        plan = json.loads(Path(plan_path).read_text())
        rows = [row for batch in plan["steps"] for row in batch]
        self.packed = packed
        if packed:
            self.rows = [{"tokens": torch.tensor(r["input_ids"]), "labels": torch.tensor(r["labels"]),
                          "input_pos": torch.tensor(r["position_ids"]),
                          "seq_lens": torch.tensor(r["seq_lens"])} for r in rows]
        else:
            self.rows = [{"tokens": r["input_ids"], "labels": r["labels"]} for r in rows]

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict:
        return self.rows[i]


def plan_dataset(tokenizer: PlanTokenizer, plan: str, packed: bool = False) -> PlanDataset:
    return PlanDataset(plan, packed)


class StepClockLogger:
    """A torchtune metric logger: the recipe calls ``log_dict`` once per optimizer step (with
    ``log_every_n_steps: 1``, torchtune's usual setting), after ``optimizer.step()`` and the
    ``loss.item()`` that syncs the device; it stamps the time and keeps the loss."""

    def __init__(self) -> None:
        import time

        self._now = time.perf_counter
        self.ends: list[float] = []
        self.losses: list[float] = []
        self.cuda = False

    def log_config(self, config: Any) -> None:
        pass

    def log(self, name: str, data: Any, step: int) -> None:
        pass

    def log_dict(self, payload: dict, step: int) -> None:
        if self.cuda:
            import torch

            torch.cuda.synchronize()
        self.ends.append(self._now())
        self.losses.append(float(payload["loss"]))

    def close(self) -> None:
        pass
