"""The quick evaluation: loss / perplexity on a dataset split, and the exact match of greedy
answers against the references, with no extra package.

The data comes through the recipe's own pipeline (``load_split``), so any dataset the recipe
trains on can be evaluated, with the same prompts and tokens:

* **loss / perplexity**: the token-mean next-token loss over the split's label tokens, each
  sample padded on its own (``--batching_strategy`` does not change the number); with padding
  it is the recipe's ``val_loss`` on the same split;
* **exact match**: for each tokenised sample, the prompt is the tokens before its first trained
  label and the reference is that first run of trained labels up to the end-of-sequence token,
  decoded: what the model was trained to answer. For ``alpaca_dataset`` the prompt is
  ``alpaca_prompt(row)`` with BOS and the reference is ``row["output"]``. Answers are generated
  and scored by :mod:`shardtune.eval.answers` (greedy, cut at EOS, whitespace-stripped exact
  match), the rules the example lm-eval task (examples/eval_tasks/shardtune_demo) follows.

A vision model (fed by its processor) and a custom dataset that brings its own collator get the
loss only: their samples are not token lists a prompt can be cut from.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import torch

from ..outputs import ownership
from ..outputs.atomic import atomic_write
from ..batches import IGNORE_INDEX
from ..config import Config
from ..config.configs import BatchingStrategy
from ..config.errors import ShardtuneError
from ..model.loading import text_tokenizer
from .answers import default_max_new_tokens, generate_from_ids, score, stop_ids

SPLITS = ("test", "train", "all")  # all: the test split's samples, then the train split's
N_EXAMPLES = 3  # answers shown in the table and kept in the JSON without --log_samples
# --run_eval_after scores the answers of at most this many samples of the eval split (the loss
# covers all of it): generating answers costs far more than a forward pass.
AFTER_TRAINING_ANSWERS = 200
METRICS_KEY = "eval_after"  # where --run_eval_after's results go in metrics.json


@dataclass
class AnswerCase:
    """One sample as a question: its prompt tokens and the text it was trained to answer."""

    prompt: list[int]
    reference: str


def answer_case(sample: Any, tokenizer, stops: Sequence[int]) -> Optional[AnswerCase]:
    """The prompt (tokens before the first trained label, pads dropped) and the reference (that
    run of trained labels up to its first stop id, decoded) of a tokenised sample; None for a
    sample that is not a dict of token lists."""
    if not isinstance(sample, Mapping) or "input_ids" not in sample or "labels" not in sample:
        return None
    ids, labels = list(sample["input_ids"]), list(sample["labels"])
    mask = list(sample.get("attention_mask") or [1] * len(ids))
    # labels[0] is never a target (the loss shifts by one), as the data checks assume.
    first = next((i for i in range(1, len(labels)) if labels[i] != IGNORE_INDEX), None)
    if first is None:
        return None
    end = next((i for i in range(first, len(labels)) if labels[i] == IGNORE_INDEX), len(labels))
    stop_set = set(stops)
    answer = []
    for token in labels[first:end]:
        if token in stop_set:
            break
        answer.append(token)
    prompt = [t for t, m in zip(ids[:first], mask[:first]) if m]
    return AnswerCase(prompt=prompt, reference=tokenizer.decode(answer, skip_special_tokens=True))


def load_samples(cfg: Config, tokenizer, split: str) -> tuple[list, Optional[Any], list[str]]:
    """(samples, the split's collate_fn, data report lines) of ``cfg``'s dataset."""
    from ..data import load_split

    if split not in SPLITS:
        raise ShardtuneError(f"--split must be one of {', '.join(SPLITS)}, got {split!r}.")
    parts = ("test", "train") if split == "all" else (split,)
    samples: list = []
    collate_fn, report = None, []
    for part in parts:
        loaded = load_split(cfg, tokenizer, part)
        samples += loaded.samples
        collate_fn = collate_fn or loaded.collate_fn
        report.append(loaded.report.summary())
    return samples, collate_fn, report


def split_loss(model, tokenizer, samples: list, collate_fn, *, batch_size: int, context_length: int,
               required_keys: Sequence[str] = ()) -> dict:
    """Token-mean loss and perplexity over ``samples``, each padded on its own (no packing)."""
    from ..data import build_dataloader
    from ..parallel.distributed import DistEnv
    from ..train.loop import evaluate

    loader = build_dataloader(samples, tokenizer=tokenizer, strategy=BatchingStrategy.padding,
                              batch_size=batch_size, context_length=context_length, shuffle=False,
                              seed=0, drop_last=False, num_workers=0, collate_fn=collate_fn,
                              required_keys=required_keys)
    was_training = model.training
    result = evaluate(model, loader, env=DistEnv(device=next(model.parameters()).device),
                      progress_desc="Loss")
    model.train(was_training)  # evaluate() leaves the model in training mode
    return {"loss": result.loss, "perplexity": result.perplexity, "label_tokens": result.label_tokens}


def answer_accuracy(model, tokenizer, samples: list, *, batch_size: int,
                    max_new_tokens: Optional[int] = None, log_samples: bool = False) -> dict:
    """Exact match of greedy answers against the samples' references (see the module doc)."""
    stops = stop_ids(model, tokenizer)
    cases = [answer_case(s, tokenizer, stops) for s in samples]
    if not cases or any(c is None for c in cases):
        return {"exact_match": None,
                "answers_note": "no generated answers: the samples are not token lists with trained labels"}
    if max_new_tokens is None:
        max_new_tokens = default_max_new_tokens(
            [len(tokenizer.encode(c.reference, add_special_tokens=False)) for c in cases])
    answers = generate_from_ids(model, tokenizer, [c.prompt for c in cases], max_new_tokens, batch_size, stops)
    correct = [score(c.reference, a) for c, a in zip(cases, answers)]
    rows = [{"reference": c.reference, "answer": a, "correct": ok} for c, a, ok in zip(cases, answers, correct)]
    out = {"exact_match": sum(correct) / len(cases), "answered": len(cases), "correct": sum(correct),
           "max_new_tokens": max_new_tokens, "examples": rows[:N_EXAMPLES]}
    if log_samples:
        out["answers"] = rows
    return out


def quick_eval(model, tokenizer, cfg: Config, *, split: str = "test", limit: Optional[int] = None,
               batch_size: int = 8, max_new_tokens: Optional[int] = None, answers: bool = True,
               answer_limit: Optional[int] = None, log_samples: bool = False) -> dict:
    """Loss / perplexity of ``model`` on ``split`` of ``cfg``'s dataset (its first ``limit``
    samples), and the exact match of its greedy answers (on the first ``answer_limit`` of those).

    ``tokenizer`` is what ``load_for_inference`` returns: a tokenizer, or a vision model's
    processor (then only the loss is measured)."""
    from ..model.family import family_for_config

    samples, collate_fn, report = load_samples(cfg, tokenizer, split)
    if limit is not None:
        samples = samples[:limit]
    family = family_for_config(model.config)
    result: dict = {"dataset": cfg.train.dataset, "split": split, "samples": len(samples), "data": report}
    result.update(split_loss(model, tokenizer, samples, collate_fn, batch_size=batch_size,
                             context_length=cfg.train.context_length,
                             required_keys=family.required_batch_keys))
    if not answers:
        return result
    if family.uses_processor or text_tokenizer(tokenizer) is not tokenizer:
        result.update(exact_match=None, answers_note="no generated answers: a vision model's questions "
                                                     "need their images (the loss covers them)")
        return result
    chosen = samples if answer_limit is None else samples[:answer_limit]
    result.update(answer_accuracy(model, tokenizer, chosen, batch_size=batch_size,
                                  max_new_tokens=max_new_tokens, log_samples=log_samples))
    return result


def format_quick(result: dict) -> list[str]:
    """The results as a short table, for printing."""
    lines = [f"{'metric':<12} value",
             f"{'loss':<12} {result['loss']:.4f}",
             f"{'perplexity':<12} {result['perplexity']:.4f}"]
    if result.get("exact_match") is not None:
        lines.append(f"{'exact_match':<12} {result['exact_match']:.1%} "
                     f"({result['correct']}/{result['answered']} answers, at most "
                     f"{result['max_new_tokens']} new tokens)")
    elif result.get("answers_note"):
        lines.append(f"{'exact_match':<12} n/a ({result['answers_note']})")
    lines.append(f"on {result['samples']} samples of {result['dataset']} [{result['split']}]")
    for ex in result.get("examples", []):
        mark = "ok" if ex["correct"] else "wrong"
        lines.append(f"  expected {ex['reference']!r} | got {ex['answer'].strip()!r}  [{mark}]")
    return lines


def add_to_metrics(output_dir: str | Path, result: dict) -> Path:
    """Put ``result`` into ``output_dir/metrics.json`` under ``eval_after`` (the file is created
    if the run wrote none), atomically, and record the file as shardtune's."""
    out = Path(output_dir)
    path = out / "metrics.json"
    try:
        metrics = json.loads(path.read_text()) if path.is_file() else {}
    except (OSError, json.JSONDecodeError):
        metrics = {}
    if not isinstance(metrics, dict):
        metrics = {}
    metrics[METRICS_KEY] = result
    atomic_write(path, json.dumps(metrics, indent=2))
    ownership.record(out, added=[path.name])
    return path


def evaluate_after_training(cfg: Config, results: dict, device: torch.device) -> Optional[dict]:
    """``--run_eval_after``: the quick evaluation of what the run saved in ``--output_dir`` (the
    model or adapter, as a user gets it: with validation, the one of the best eval loss), on the
    eval split; added to ``metrics.json``. ``results`` is the recipe's. Runs in the main process
    after the process group is gone."""
    from ..infer.generate import inference_dtype
    from ..infer.loading import load_for_inference

    t = cfg.train
    if results.get("preempted") or not results.get("saved_at_steps"):
        why = "was pre-empted" if results.get("preempted") else "saved no model"
        print(f"--run_eval_after: skipped, this run {why}.", flush=True)
        return None
    model, tokenizer = load_for_inference(t.output_dir, base=t.model_name if t.use_peft else None,
                                          device=str(device), dtype=inference_dtype("auto", device.type))
    result = {"model": str(t.output_dir),
              **quick_eval(model, tokenizer, cfg, split="test", batch_size=t.val_batch_size,
                           answer_limit=AFTER_TRAINING_ANSWERS)}
    path = add_to_metrics(t.output_dir, result)
    print(f"--run_eval_after: the saved {'adapter' if t.use_peft else 'model'} on the eval split "
          f"(added to {path}):", flush=True)
    for line in format_quick(result):
        print("   ", line, flush=True)
    return result
