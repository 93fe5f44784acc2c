"""Configuration: llama-recipes' dataclasses, the parser and validation."""

from .configs import (
    DATASET_CONFIGS, SECTIONS, BatchingStrategy, ChatTrainOn, Device, OverlongPolicy, PeftMethod,
    Scheduler, ShardingStrategy, StateDictType, alpaca_dataset, custom_dataset, fsdp_config,
    grammar_dataset, llama_adapter_config, lora_config, quantization_config, samsum_dataset,
    train_config, wandb_config,
)
from .errors import ConfigError, ShardtuneError
from .parse import Config, ParsedArgs, apply_assignments, describe_options, parse_args

__all__ = [
    "DATASET_CONFIGS", "SECTIONS", "BatchingStrategy", "ChatTrainOn", "Device", "OverlongPolicy", "PeftMethod",
    "Scheduler", "ShardingStrategy", "StateDictType", "alpaca_dataset", "custom_dataset",
    "fsdp_config", "grammar_dataset", "llama_adapter_config", "lora_config",
    "quantization_config", "samsum_dataset", "train_config", "wandb_config", "ConfigError",
    "ShardtuneError", "Config", "ParsedArgs", "apply_assignments", "describe_options",
    "parse_args",
]
