"""Find a tiny-model size and hyperparameters under which ``shardtune demo`` learns its task fast.

The training loop here is a plain PyTorch loop that mirrors what shardtune's recipe does with
``--dataset alpaca_dataset --batching_strategy padding`` on one CPU process:

* data: ``write_task_data`` -> ``train.json``; each row is tokenised like llama-recipes'
  alpaca loader (``encode(alpaca_prompt(row) + output)`` with BOS, then EOS appended; the prompt
  tokens get label -100); the first 5% of ``train.json`` is held out as the loader's eval split;
* batches of ``batch_size`` samples, shuffled each epoch, right-padded to the longest sample
  (pad labels -100);
* loss = HF ``model(input_ids, attention_mask, labels).loss`` (mean cross-entropy over label
  tokens), fp32, AdamW with weight_decay 0, ``torch.set_num_threads(threads)`` (the demo uses 1);
* lr schedule = ``shardtune.train.optim.lr_factor`` stepped per optimizer step: ``steplr``
  (llama-recipes: x gamma after each epoch) or ``cosine`` with linear warm-up.

Accuracy (``task_accuracy``: greedy exact match) is measured on ``eval.json`` rows that are never
in ``train.json``; the time to measure it is not counted as training time. Count optimizer steps
to 100%, not seconds, when the machine is shared: step times there vary 10x from minute to minute.

What the search found (the task of ``shardtune.demo.task``; ``--eval_every 50``, bs 32, lr 3e-3
cosine, warm-up 20; "stalled" = 0% at step 354):

* hidden 64 (0.16M parameters), 6 epochs: 100% by step 200 for seeds 0-3, by step 250 for seed
  4. The demo's setting (``SEARCH[0]``) is this for 8 epochs (472 steps): 100% by step 250 for
  seed 0 here, and 100% at the end of ``shardtune demo`` for seeds 0-6;
* hidden 128 (0.5M), 6 epochs: 100% by step 150 for seed 1 but stalled for seed 0 (it copied the
  digits, never the letters);
* letters limited to a-j / A-J (``--members 10``): hidden 128, seed 0 learned by step 250, so
  copying is slower the more distinct tokens a kind has.

Earlier task designs (reversal, capitalising letters, answers with commas between the items) learned
far more slowly with every setting tried: see the task module.

    python -m benchmarks.demo_tuning                 # the search below (a few minutes)
    python -m benchmarks.demo_tuning --only 0        # one configuration of the search
    python -m benchmarks.demo_tuning --hidden 128 --seed 1 --epochs 6 --eval_every 50
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from shardtune.config.configs import Scheduler
from shardtune.data.prompts import alpaca_prompt
from shardtune.demo.accuracy import show_examples, task_accuracy
from shardtune.demo.task import KINDS, write_task_data
from shardtune.demo.tiny import build_tiny_llama
from shardtune.batches import IGNORE_INDEX
from shardtune.train.optim import lr_factor

from . import common


@dataclass
class Setting:
    hidden: int = 64
    layers: int = 2
    heads: int = 4
    kv_heads: int = 2
    intermediate: int = 0  # 0: 3 * hidden (tiny_llama_config's default)
    lr: float = 3e-3
    batch_size: int = 32
    epochs: int = 8
    scheduler: str = "cosine"  # cosine | steplr | constant | linear
    warmup_steps: int = 20
    gamma: float = 0.85
    n_train: int = 2000
    n_eval: int = 200
    seed: int = 0
    sep: str = ","  # task format: items joined by this
    kinds: int = 0  # 0 = all of shardtune.demo.task.KINDS, else its first `kinds`
    members: int = 0  # 0 = every member of each kind, else only its first `members`
    threads: int = 1  # torch intra-op threads (shardtune.demo.driver.NUM_THREADS)


# The search: the demo's setting over a few seeds, then the alternatives that did worse; each
# well under a minute of training on an idle 2-core machine.
SEARCH = [
    Setting(),
    *(Setting(seed=seed) for seed in (1, 2, 3, 4)),
    Setting(hidden=128, epochs=6),
    Setting(hidden=128, epochs=6, seed=1),
    Setting(hidden=128, epochs=6, members=10),
]


def task_kinds(s: Setting) -> tuple:
    kinds = KINDS[:s.kinds or len(KINDS)]
    return tuple((name, members[:s.members or len(members)]) for name, members in kinds)


def tokenize_row(tokenizer, row: dict) -> dict:
    """llama-recipes' alpaca sample: prompt + answer + EOS, labels -100 on the prompt."""
    prompt = alpaca_prompt(row)
    prompt_ids = tokenizer.encode(prompt)
    ids = tokenizer.encode(prompt + row["output"]) + [tokenizer.eos_token_id]
    assert ids[:len(prompt_ids)] == prompt_ids, "prompt tokens changed when the answer was appended"
    labels = [IGNORE_INDEX] * len(prompt_ids) + ids[len(prompt_ids):]
    return {"input_ids": ids, "labels": labels}


def collate(samples: list[dict], pad_id: int) -> dict:
    width = max(len(s["input_ids"]) for s in samples)
    ids = torch.full((len(samples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(samples), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(samples), width), dtype=torch.long)
    for i, s in enumerate(samples):
        n = len(s["input_ids"])
        ids[i, :n] = torch.tensor(s["input_ids"])
        labels[i, :n] = torch.tensor(s["labels"])
        mask[i, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def run(s: Setting, workdir: Path, eval_every: int = 0, verbose: bool = True) -> dict:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(s.threads)
    model_dir = build_tiny_llama(
        workdir / "model", seed=s.seed, max_positions=256, hidden_size=s.hidden,
        num_layers=s.layers, num_heads=s.heads, num_kv_heads=s.kv_heads,
        intermediate_size=s.intermediate or None)
    train_json, eval_json = write_task_data(workdir / "data", s.n_train, s.n_eval, s.seed, sep=s.sep,
                                           kinds=task_kinds(s))
    eval_rows = json.loads(eval_json.read_text())
    train_rows = json.loads(train_json.read_text())
    n_holdout = max(1, int(len(train_rows) * 0.05))  # the loader's own eval split
    train_rows = train_rows[n_holdout:]

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    n_params = sum(p.numel() for p in model.parameters())
    before = task_accuracy(model, tokenizer, eval_rows)

    samples = [tokenize_row(tokenizer, r) for r in train_rows]
    steps_per_epoch = len(samples) // s.batch_size  # drop_last, like llama-recipes' samplers
    total = steps_per_epoch * s.epochs
    opt = torch.optim.AdamW(model.parameters(), lr=s.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: lr_factor(
        step, scheduler=Scheduler(s.scheduler), warmup_steps=s.warmup_steps,
        steps_per_epoch=steps_per_epoch, total_steps=total, gamma=s.gamma))
    rng = random.Random(s.seed)
    torch.manual_seed(s.seed)

    train_s, step, curve, step_times = 0.0, 0, [], []
    model.train()
    for epoch in range(s.epochs):
        order = list(range(len(samples)))
        rng.shuffle(order)
        for b in range(steps_per_epoch):
            t0 = time.perf_counter()
            batch = collate([samples[i] for i in order[b * s.batch_size:(b + 1) * s.batch_size]],
                            tokenizer.pad_token_id)
            loss = model(**batch).loss
            loss.backward()
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            step_times.append(time.perf_counter() - t0)
            train_s += step_times[-1]
            step += 1
            if eval_every and step % eval_every == 0:
                acc = task_accuracy(model, tokenizer, eval_rows[:100])
                curve.append((step, round(train_s, 1), round(loss.item(), 4), acc))
                if verbose:
                    print(f"  step {step:4d}  t={train_s:6.1f}s  loss={loss.item():.4f}  acc={acc:.0%}",
                          flush=True)
        if verbose and not eval_every:
            print(f"  epoch {epoch + 1}  step {step}  t={train_s:6.1f}s  loss={loss.item():.4f}",
                  flush=True)

    t0 = time.perf_counter()
    after = task_accuracy(model, tokenizer, eval_rows)
    eval_s = time.perf_counter() - t0
    result = {**asdict(s), "params": n_params, "steps": step, "train_s": round(train_s, 1),
              "median_step_s": round(sorted(step_times)[len(step_times) // 2], 4),
              "final_loss": round(loss.item(), 4), "acc_before": before, "acc_after": after,
              "eval_s": round(eval_s, 1), "curve": curve}
    if verbose:
        for line in show_examples(model, tokenizer, eval_rows[:3]):
            print("   ", line)
    return result


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.demo_tuning", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", type=int, nargs="*", help="indices into SEARCH to run")
    ap.add_argument("--eval_every", type=int, default=0, help="score 100 eval rows every N steps")
    ap.add_argument("--json", type=Path, help="append results (one JSON per line) to this file")
    for f, default in asdict(Setting()).items():
        ap.add_argument(f"--{f}", type=type(default), default=None)
    args = ap.parse_args(argv)

    overrides = {f: getattr(args, f) for f in asdict(Setting()) if getattr(args, f) is not None}
    if overrides:
        settings = [replace(Setting(), **overrides)]
    else:
        settings = [SEARCH[i] for i in args.only] if args.only is not None else SEARCH

    results = []
    for s in settings:
        print(f"== {s}", flush=True)
        with tempfile.TemporaryDirectory() as tmp:
            r = run(s, Path(tmp), eval_every=args.eval_every)
        results.append(r)
        print(f"   -> {r['params'] / 1e6:.2f}M params, {r['steps']} steps in {r['train_s']}s "
              f"(median step {r['median_step_s']}s), "
              f"loss {r['final_loss']}, accuracy {r['acc_before']:.0%} -> {r['acc_after']:.0%}",
              flush=True)
        if args.json:
            with args.json.open("a") as fh:
                fh.write(json.dumps(r) + "\n")

    print("\nsetting                                              train_s  before  after")
    for r in results:
        desc = (f"h{r['hidden']} L{r['layers']} heads{r['heads']}/{r['kv_heads']} lr{r['lr']:g} "
                f"bs{r['batch_size']} ep{r['epochs']} {r['scheduler']} wu{r['warmup_steps']} "
                f"n{r['n_train']}")
        print(f"{desc:52s} {r['train_s']:7.1f}  {r['acc_before']:5.0%}  {r['acc_after']:5.0%}")


if __name__ == "__main__":
    common.entry(main)
