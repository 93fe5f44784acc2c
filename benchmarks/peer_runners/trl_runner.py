"""TRL ``SFTTrainer``'s rows of the peer benchmark (runs in the peer virtual environment).

The dataset is already tokenised (``input_ids`` + ``labels``), so TRL's preparation is skipped
(``dataset_kwargs={"skip_prepare_dataset": True}``) and its own collator
(``DataCollatorForLanguageModeling``) builds the batches. Padded mode: rows padded to the
longest, with an attention mask. Packed mode: the plan's chunks carry ``seq_lengths``, the column
TRL's own packing writes, and ``padding_free=True`` makes the collator flatten each batch into
one row with per-document ``position_ids`` (TRL's packed layout: ``[1, batch * seq_len]``).
The chunks are shardtune's best-fit packing of the documents; TRL's own packer (``bfd``) would
group them differently, and the first-step losses could no longer be compared.
Everything else is as in ``hf_trainer.py`` (the same TrainingArguments).

    PEER_PY -m benchmarks.peer_runners.trl_runner SPEC.json      (from the repository root)
"""

from __future__ import annotations

from pathlib import Path

from . import _runner
from .hf_trainer import RecordingCollator, clock_callback, load_model, recording_trainer, training_arguments


def run(spec: dict, mode: str) -> dict:
    import datasets
    from transformers import AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    plan = _runner.load_plan(spec["plans"][mode])
    packed = mode == "packed"
    rows = [{"input_ids": r["input_ids"], "labels": r["labels"],
             **({"seq_lengths": r["seq_lens"]} if packed else {})} for r in _runner.plan_rows(plan)]
    dataset = datasets.Dataset.from_list(rows)
    tokenizer = AutoTokenizer.from_pretrained(spec["model_dir"])
    clock = _runner.StepClock(spec["device"])
    with _runner.MemoryProbe(spec["device"]) as mem:
        model = load_model(spec)
        args = SFTConfig(**training_arguments(
            spec, Path(spec["workdir"]) / f"trl_{mode}_out", packing=False, padding_free=packed,
            max_length=None, dataset_kwargs={"skip_prepare_dataset": True}))
        trainer = recording_trainer(SFTTrainer)(model=model, args=args, train_dataset=dataset,
                                                processing_class=tokenizer,
                                                callbacks=[clock_callback(clock)])
        trainer.step_losses = []
        collator = RecordingCollator(trainer.data_collator, plan["pad_id"])
        trainer.data_collator = collator  # read when train() builds its DataLoader
        trainer.train()
    _runner.check_first_batches(collator.checksums, plan, "trl")
    return {"framework": "trl", "mode": mode, "step_ends": clock.ends,
            "losses": [float(x) for x in trainer.step_losses], "memory": mem.result(),
            "versions": _runner.versions("trl", "accelerate")}


if __name__ == "__main__":
    _runner.run_modes(run)
