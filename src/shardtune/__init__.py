"""shardtune: fine-tune Llama-family models with PyTorch FSDP2; checkpoints load in transformers."""

__version__ = "0.1.0"
