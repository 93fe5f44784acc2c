"""TRL's labels for the peer check in test_chat_dataset.py, run in a subprocess with TRL on the path:

    python trl_peer.py MODEL_DIR JOBS.json WORK_DIR

JOBS.json is a list of ``{"tokenizer": DIR, "rows": [{"messages": [...], "tools": ...}], "out":
PATH}``. For each job TRL's ``SFTTrainer`` prepares the rows with ``assistant_only_loss=True`` as a
user's run would (it swaps in its training copy of the tokenizer's template, the one with
``{% generation %}`` markers); OUT gets each row's ``input_ids`` and ``labels``.
"""

from __future__ import annotations

import json
import sys


def main() -> None:
    from datasets import Dataset
    from transformers import AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    model_dir, jobs_path, work = sys.argv[1:4]
    for k, job in enumerate(json.loads(open(jobs_path).read())):
        tokenizer = AutoTokenizer.from_pretrained(job["tokenizer"])
        args = SFTConfig(output_dir=f"{work}/{k}", assistant_only_loss=True, report_to=[], max_length=None,
                         use_cpu=True)
        trainer = SFTTrainer(model=model_dir, args=args, train_dataset=Dataset.from_list(job["rows"]),
                             processing_class=tokenizer)
        out = [{"input_ids": r["input_ids"], "labels": r["labels"]} for r in trainer.train_dataset]
        with open(job["out"], "w") as f:
            json.dump(out, f)


if __name__ == "__main__":
    main()
