"""``python -m shardtune.finetuning`` (llama-recipes' ``finetuning.py``; torchrun's ``-m`` form).

A package's ``__main__`` rather than the recipe module run by name: multiprocessing runs a main
module whose name does not end in ".__main__" again in every process its fork server starts, so
every DataLoader worker of every rank would import the whole recipe (~7 s CPU; data/workers.py).
"""

from ..exits import run_with_clean_errors
from . import main

run_with_clean_errors(main)
