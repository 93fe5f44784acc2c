"""shardtune: fine-tune Llama-family models with PyTorch FSDP2; checkpoints load in transformers."""

import logging

__version__ = "0.1.0"

# bitsandbytes' CPU backend (imported by peft whenever bitsandbytes is installed) warns at import
# that an optional kernel from the Hugging Face hub is missing, then uses its own CPU kernels;
# the warning would head every command's output. Only that one logger is quietened.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
# With HF_HUB_OFFLINE=1 (tests, offline clusters), the `kernels` package that bitsandbytes imports
# logs that it skips a publisher check for a kernel it then does not use, once per process.
logging.getLogger("kernels._internals.hf_hub").setLevel(logging.ERROR)
