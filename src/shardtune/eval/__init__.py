"""Evaluation: ``shardtune eval`` and ``--run_eval_after``.

* :mod:`.answers`: greedy answers from prompt tokens and their exact match (shared with the demo);
* :mod:`.quick`: the quick evaluation (loss, perplexity, exact match) on a dataset split;
* :mod:`.harness`: EleutherAI's lm-evaluation-harness on a model in memory (``shardtune[eval]``);
* :mod:`.output` and :mod:`.cli`: the command and the JSON it writes.
"""
