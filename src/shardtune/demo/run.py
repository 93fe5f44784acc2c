"""``shardtune demo``: a tiny Llama fine-tuned end to end on CPU, shown to have learned.

1. build a random-initialised tiny Llama and a locally trained tokenizer (no downloads);
2. generate a synthetic instruction task in alpaca format: put a shuffled capital letter, even
   digit, small letter and odd digit into that order (``"7,k,B,4"`` -> ``"B4k7"``), with
   held-out rows whose inputs are never trained on (see ``shardtune.demo.task``);
3. score the untrained model on the held-out rows (greedy exact match);
4. fine-tune with the real recipe (``shardtune.finetuning``) on ``alpaca_dataset``, on 2 FSDP ranks
   launched with torchrun by default (``--nproc_per_node 1``: in this process);
5. load the saved Hugging Face directory back with plain ``transformers`` and score it again;
6. convert the run's sharded (DCP) checkpoint into a second Hugging Face directory with
   ``shardtune convert`` and check that it gives the same logits as the model of step 5 (with
   ``--nproc_per_node 1`` there is no sharded checkpoint, and this step is skipped).

Exits with status 1 if the fine-tuned model did not learn the task or the converted checkpoint
differs from it.

``--dpo`` runs them with preference tuning (``--use_dpo``) on pairs of the same task and prints
held-out preference accuracy (``shardtune.demo.preference``). ``--vision`` runs the same six steps for a tiny Llama 3.2 Vision model on an image task
(``shardtune.demo.vision``); both demos are a ``DemoTask`` run by ``shardtune.demo.driver``.
"""

from __future__ import annotations

import argparse
from typing import Optional, Sequence

from .driver import run_demo
from .text import TEXT_DEMO


def main(argv: Optional[Sequence[str]] = None) -> dict:
    ap = argparse.ArgumentParser(prog="shardtune demo", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--vision", action="store_true",
                    help="the vision demo: a tiny Llama 3.2 Vision model learns to name a shape's colour")
    ap.add_argument("--dpo", action="store_true",
                    help="the preference demo: the tiny Llama learns to prefer the right answer with --use_dpo")
    ap.add_argument("--output_dir", help="where everything is written (default: demo_out, "
                                         "demo_vision_out with --vision, demo_dpo_out with --dpo)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--nproc_per_node", type=int, default=2,
                    help="FSDP ranks to train with (default 2, on gloo); 1 trains in this process")
    args = ap.parse_args(argv)
    if args.vision and args.dpo:
        ap.error("--vision and --dpo are two different demos; choose one")
    if args.dpo:
        from .preference import PREFERENCE_DEMO

        task, default_dir = PREFERENCE_DEMO, "demo_dpo_out"
    elif args.vision:
        from .vision import VISION_DEMO  # imported only when asked for: it draws with PIL

        task, default_dir = VISION_DEMO, "demo_vision_out"
    else:
        task, default_dir = TEXT_DEMO, "demo_out"
    if not 1 <= args.nproc_per_node <= task.global_batch or task.global_batch % args.nproc_per_node:
        ap.error(f"--nproc_per_node must divide the global batch of {task.global_batch}")
    return run_demo(task, args.output_dir or default_dir, args.seed, args.nproc_per_node)
