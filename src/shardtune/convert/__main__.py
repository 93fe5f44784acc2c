"""``python -m shardtune.convert SRC DST ...`` (also llama-recipes' ``--fsdp_checkpoint_path`` /
``--consolidated_model_path`` / ``--HF_model_path_or_name``); ``python -m shardtune.convert inspect PATH``."""

import sys

from ..exits import run_with_clean_errors
from .cli import convert_main, inspect_main

if __name__ == "__main__":
    argv = sys.argv[1:]
    if argv[:1] == ["inspect"]:
        run_with_clean_errors(lambda: inspect_main(argv[1:]))
    else:
        run_with_clean_errors(lambda: convert_main(argv))
