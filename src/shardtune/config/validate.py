"""Cross-field checks: combinations that cannot work are refused before any work starts."""

from __future__ import annotations

import dataclasses
import importlib.util

from .configs import NOT_IMPLEMENTED, SECTIONS, ShardingStrategy
from .errors import ConfigError, ShardtuneError


def _check_not_implemented(cfg) -> None:
    for key, why in NOT_IMPLEMENTED.items():
        section, _, name = key.partition(".")
        default = getattr(SECTIONS[section](), name)
        if getattr(cfg.section(section), name) != default:
            raise ConfigError(f"--{name} was set, but it is not implemented in this version of "
                              f"shardtune ({why}). Remove the option: shardtune refuses options "
                              "it would otherwise silently ignore.")


# (section attribute, field, test, the rule in words). Non-finite floats are refused by the parser.
_RANGES = (
    ("train", "lr", lambda v: v > 0, "must be positive"),
    ("train", "gamma", lambda v: v > 0, "must be positive (the learning rate is multiplied by it after "
                                        "every epoch; 1 keeps it constant)"),
    ("train", "weight_decay", lambda v: v >= 0, "must be 0 or more"),
    ("train", "eval_fraction", lambda v: 0 < v < 1, "must be between 0 and 1 (exclusive)"),
    ("lora", "r", lambda v: v >= 1, "must be at least 1"),
    ("lora", "lora_alpha", lambda v: v > 0, "must be positive"),
    ("lora", "lora_dropout", lambda v: 0 <= v < 1, "must be at least 0 and below 1"),
    ("llama_adapter", "adapter_len", lambda v: v >= 1, "must be at least 1"),
    ("llama_adapter", "adapter_layers", lambda v: v >= 1, "must be at least 1"),
)


def _check_ranges(cfg) -> None:
    if cfg.train.gradient_clipping and cfg.train.gradient_clipping_threshold <= 0:
        raise ConfigError("--gradient_clipping_threshold must be positive when --gradient_clipping is on; "
                          f"got {cfg.train.gradient_clipping_threshold}.")
    for section, name, ok, rule in _RANGES:
        value = getattr(getattr(cfg, section), name)
        if not ok(value):
            raise ConfigError(f"--{name} {rule}; got {value}.")


def validate(cfg) -> None:
    t, f = cfg.train, cfg.fsdp
    _check_not_implemented(cfg)
    positive = {"batch_size_training": t.batch_size_training, "val_batch_size": t.val_batch_size,
                "gradient_accumulation_steps": t.gradient_accumulation_steps,
                "num_epochs": t.num_epochs}
    for name, value in positive.items():
        if value < 1:
            raise ConfigError(f"--{name} must be at least 1, got {value}.")
    for name in ("max_train_step", "max_eval_step", "warmup_steps", "num_workers_dataloader",
                 "flop_counter_start", "num_freeze_layers"):
        if getattr(t, name) < 0:
            raise ConfigError(f"--{name} must be 0 or more, got {getattr(t, name)}.")
    if t.context_length < 2:
        raise ConfigError(f"--context_length must be at least 2 tokens, got {t.context_length}.")
    _check_ranges(cfg)
    if t.flop_counter and t.use_profiler:
        raise ConfigError("--flop_counter and --use_profiler cannot be used together (each one "
                          "wraps the training steps); choose one.")
    if (t.use_fp16 or f.use_fp16) and f.pure_bf16:
        raise ConfigError("--use_fp16 and --fsdp_config.pure_bf16 ask for two different "
                          "precisions; choose one.")
    if f.hsdp and f.sharding_strategy != ShardingStrategy.HYBRID_SHARD:
        raise ConfigError("--fsdp_config.hsdp needs --fsdp_config.sharding_strategy HYBRID_SHARD.")
    if f.optimizer.lower() not in ("adamw", "anyprecision"):
        raise ConfigError(f"--fsdp_config.optimizer must be AdamW or anyprecision, got {f.optimizer!r}.")
    if t.freeze_layers and t.use_peft:
        raise ConfigError("--freeze_layers and --use_peft both choose which weights train; "
                          "PEFT already freezes the base model. Use one of them.")
    if t.run_eval_after and not t.save_model:
        raise ConfigError("--run_eval_after evaluates the model the run saves in --output_dir, and "
                          "--save_model is off; turn --save_model on, or drop --run_eval_after.")
    if t.use_wandb and importlib.util.find_spec("wandb") is None:
        raise ConfigError("--use_wandb needs the wandb package: pip install 'shardtune[wandb]' "
                          "(or drop --use_wandb).")
    _check_loggers(cfg)
    _check_quantization(cfg)
    _check_fsdp_options(cfg)
    _check_checkpoint_options(cfg)
    _check_speed_options(cfg)
    _check_preference(cfg)
    if t.from_peft_checkpoint and not t.use_peft:
        raise ConfigError("--from_peft_checkpoint needs --use_peft (it continues training an adapter).")
    if t.from_peft_checkpoint:
        section = "lora_config" if t.peft_method.value == "lora" else "llama_adapter_config"
        current, defaults = cfg.section(section), SECTIONS[section]()
        changed = [f.name for f in dataclasses.fields(current) if getattr(current, f.name) != getattr(defaults, f.name)]
        if changed:
            raise ConfigError(
                f"--{section}.{changed[0]} was set, but --from_peft_checkpoint continues the adapter with the "
                "settings of its own adapter_config.json, so it would be ignored. Remove the option, or "
                "train a new adapter without --from_peft_checkpoint.")


def _check_loggers(cfg) -> None:
    t, w = cfg.train, cfg.wandb
    if t.peak_tflops is not None and not t.peak_tflops > 0:  # the parser refuses nan/inf
        raise ConfigError(f"--peak_tflops must be positive (the device's dense peak TFLOP/s in the "
                          f"compute dtype), got {t.peak_tflops}.")
    if t.tensorboard_dir and not t.use_tensorboard:
        raise ConfigError("--tensorboard_dir only applies with --use_tensorboard; add --use_tensorboard "
                          "or remove the option.")
    if t.use_tensorboard and importlib.util.find_spec("tensorboard") is None:
        raise ConfigError("--use_tensorboard needs the tensorboard package, which torch.utils.tensorboard "
                          "writes through: pip install 'shardtune[tensorboard]' (or pip install "
                          "tensorboard), or drop --use_tensorboard.")
    if w.mode is not None and w.mode not in ("online", "offline", "disabled"):
        raise ConfigError(f"--wandb_config.mode must be online, offline or disabled (or unset: wandb's "
                          f"default and the WANDB_MODE variable decide), got {w.mode!r}.")


def _check_fsdp_options(cfg) -> None:
    """FSDP-only options without --enable_fsdp would be silently ignored: refuse them."""
    t, f = cfg.train, cfg.fsdp
    if not t.enable_fsdp:
        defaults = SECTIONS["fsdp_config"]()
        for name in ("sharding_strategy", "hsdp", "sharding_group_size", "replica_group_size",
                     "fsdp_cpu_offload", "gradient_sync"):
            if getattr(f, name) != getattr(defaults, name):
                raise ConfigError(f"--fsdp_config.{name} only applies with --enable_fsdp; add "
                                  "--enable_fsdp or remove the option.")
        if t.low_cpu_fsdp:
            raise ConfigError("--low_cpu_fsdp only applies with --enable_fsdp (it loads weights "
                              "shard by shard); add --enable_fsdp or remove it.")
    if f.gradient_sync.value != "auto" and t.gradient_accumulation_steps == 1:
        raise ConfigError(f"--fsdp_config.gradient_sync {f.gradient_sync.value} chooses when gradients are reduced "
                          "across the micro-batches of --gradient_accumulation_steps, which is 1 here (every step "
                          "reduces once). Raise --gradient_accumulation_steps or remove the option.")
    if f.sharding_group_size < 0 or f.replica_group_size < 0:
        raise ConfigError("--fsdp_config.sharding_group_size and replica_group_size must be 0 "
                          "(automatic) or positive.")
    lora_extras = [name for name, on in (("--lora_config.use_dora", cfg.lora.use_dora),
                                         ("--lora_config.modules_to_save", bool(cfg.lora.modules_to_save))) if on]
    saved = _saved_adapter_config(t.from_peft_checkpoint) if t.use_peft else {}
    if saved.get("use_dora"):
        lora_extras.append("a DoRA adapter (--from_peft_checkpoint)")
    if saved.get("modules_to_save"):
        lora_extras.append("an adapter with modules_to_save (--from_peft_checkpoint)")
    if t.low_cpu_fsdp and t.use_peft and (t.peft_method.value == "lora" or saved) and lora_extras:
        raise ConfigError(f"{' and '.join(lora_extras)} with --low_cpu_fsdp: their weights are computed from, "
                          "or copied from, the loaded base weights, which the meta-device path does not have "
                          "when the adapter is created. Drop --low_cpu_fsdp for this run.")


def _saved_adapter_config(path: str) -> dict:
    """The adapter_config.json of ``--from_peft_checkpoint`` (empty when there is none to read)."""
    import json
    from pathlib import Path

    file = Path(path) / "adapter_config.json" if path else None
    if file is None or not file.is_file():
        return {}
    try:
        return json.loads(file.read_text())
    except (OSError, ValueError):
        return {}  # apply_peft reports an unreadable adapter with its own message


def _check_checkpoint_options(cfg) -> None:
    t = cfg.train
    if t.save_every_n_steps < 0 or t.keep_last_n < 0:
        raise ConfigError("--save_every_n_steps and --keep_last_n must be 0 (off) or positive.")
    if t.export_dtype is not None and t.export_dtype not in ("bf16", "bfloat16", "fp16", "float16",
                                                             "fp32", "float32"):
        raise ConfigError(f"--export_dtype must be bf16, fp16 or fp32 (or unset for the training "
                          f"dtype), got {t.export_dtype!r}.")
    if t.merge_lora and cfg.lora.use_dora:
        raise ConfigError("--merge_lora cannot merge DoRA (--lora_config.use_dora) exactly; save the adapter "
                          "and load it with PeftModel.from_pretrained, or train plain LoRA.")
    if t.merge_lora and not (t.use_peft and t.peft_method.value == "lora"):
        raise ConfigError("--merge_lora folds a LoRA adapter into the base weights; it needs "
                          "--use_peft --peft_method lora (LLaMA-Adapter cannot be merged).")
    if t.resume and t.resume_from:
        raise ConfigError("--resume (newest checkpoint of this run) and --resume_from PATH both "
                          "choose where to resume; give one.")


def _check_speed_options(cfg) -> None:
    """--loss, --compile, the activation-memory options and --optimizer_impl (docs/training.md)."""
    t, f = cfg.train, cfg.fsdp
    defaults = SECTIONS["fsdp_config"]()
    if t.loss_chunk_tokens < 1:
        raise ConfigError(f"--loss_chunk_tokens must be at least 1, got {t.loss_chunk_tokens}.")
    if t.loss_chunk_tokens != SECTIONS["train_config"]().loss_chunk_tokens and t.loss.value != "chunked":
        raise ConfigError("--loss_chunk_tokens only applies with --loss chunked; add --loss chunked or remove it.")
    if f.activation_checkpointing_every_k < 1:
        raise ConfigError(f"--activation_checkpointing_every_k must be at least 1, got "
                          f"{f.activation_checkpointing_every_k}.")
    if (f.activation_checkpointing_every_k != defaults.activation_checkpointing_every_k
            and f.activation_checkpointing_policy.value != "every_k"):
        raise ConfigError("--activation_checkpointing_every_k only applies with --activation_checkpointing_policy "
                          "every_k; add that or remove the option.")
    policy_set = f.activation_checkpointing_policy != defaults.activation_checkpointing_policy
    if policy_set and not (t.enable_fsdp and f.fsdp_activation_checkpointing):
        raise ConfigError("--activation_checkpointing_policy chooses what --fsdp_config.fsdp_activation_checkpointing "
                          "recomputes, which applies under --enable_fsdp (as in llama-recipes) and is "
                          f"{'off' if t.enable_fsdp else 'not in use without --enable_fsdp'}; turn it on or remove "
                          "the policy.")
    if f.activation_offload and not t.enable_fsdp:
        raise ConfigError("--activation_offload applies under --enable_fsdp, like activation checkpointing (one GPU: "
                          "--enable_fsdp with --nproc_per_node 1); add --enable_fsdp or remove it.")
    if t.device.value == "cpu" and f.activation_offload:
        raise ConfigError("--activation_offload moves saved activations from the GPU to CPU memory; with "
                          "--device cpu they are in CPU memory already, so there is nothing to offload. "
                          "Remove --activation_offload.")
    if t.optimizer_impl.value == "fused" and t.enable_fsdp and (t.use_fp16 or f.use_fp16):
        raise ConfigError("--optimizer_impl fused with fp16 under --enable_fsdp: torch's fused AdamW fails on FSDP's "
                          "sharded parameters when the fp16 grad scaler hands it its inf check (torch 2.13). Use "
                          "--optimizer_impl auto (the default), foreach or for_loop.")
    if t.optimizer_impl.value != "auto" and f.optimizer.lower() == "anyprecision":
        raise ConfigError("--optimizer_impl chooses torch's AdamW implementation; --fsdp_config.optimizer "
                          "anyprecision has only one. Remove one of the two options.")


def _check_preference(cfg) -> None:
    """--use_dpo and its data (train/dpo.py, data/preference.py, docs/preference.md)."""
    t, d = cfg.train, cfg.dpo
    if not t.use_dpo:
        defaults = SECTIONS["dpo_config"]()
        changed = [f.name for f in dataclasses.fields(d) if getattr(d, f.name) != getattr(defaults, f.name)]
        if changed:
            raise ConfigError(f"--dpo_config.{changed[0]} only applies with --use_dpo (preference tuning); add "
                              "--use_dpo or remove the option.")
        if t.dataset == "preference_dataset":
            raise ConfigError("--dataset preference_dataset holds chosen / rejected pairs, which only preference "
                              "tuning learns from: add --use_dpo (supervised fine-tuning on the chosen responses "
                              "alone would also train on what the rejected ones were preferred over).")
        return
    if t.dataset not in ("preference_dataset", "custom_dataset"):
        raise ConfigError(f"--use_dpo trains on preference pairs, but --dataset is {t.dataset}. Use --dataset "
                          "preference_dataset --preference_dataset.data_path FILE (rows with prompt, chosen and "
                          "rejected; docs/preference.md), or a custom_dataset whose function returns such rows.")
    if t.batching_strategy.value == "packing":
        raise ConfigError("--use_dpo needs --batching_strategy padding: each pair's chosen and rejected responses "
                          "are rows of one padded batch, scored as whole sequences, and packing would join "
                          "several pairs' responses in one row. Add --batching_strategy padding.")
    if not d.beta > 0:
        raise ConfigError(f"--dpo_config.beta must be positive, got {d.beta}.")
    if not 0 <= d.label_smoothing < 0.5:
        raise ConfigError(f"--dpo_config.label_smoothing must be at least 0 and below 0.5 (the assumed share of "
                          f"pairs whose preference is flipped), got {d.label_smoothing}.")
    if d.label_smoothing and d.loss_type.value != "sigmoid":
        raise ConfigError(f"--dpo_config.label_smoothing applies to --dpo_config.loss_type sigmoid; the "
                          f"{d.loss_type.value} loss has none. Remove it, or use the sigmoid loss.")
    if t.run_eval_after:
        raise ConfigError("--run_eval_after measures next-token loss and answer exact match, which a preference "
                          "split does not define; the run's evaluation (--run_validation) already reports the "
                          "preference loss, rewards and accuracy. Remove --run_eval_after.")


_QUANT_DTYPES = ("bfloat16", "float16", "float32")


def _check_quantization(cfg) -> None:
    """QLoRA (--quantization 4bit|8bit): what this version supports, refused clearly otherwise."""
    t, q = cfg.train, cfg.quantization
    if t.quantization is None:
        return
    if t.quantization not in ("4bit", "8bit"):
        raise ConfigError(f"--quantization must be 4bit or 8bit, got {t.quantization!r}.")
    if not t.use_peft:
        raise ConfigError("--quantization trains an adapter on a frozen quantized base (QLoRA): add "
                          "--use_peft --peft_method lora.")
    if t.enable_fsdp and t.quantization == "8bit":
        raise ConfigError("--quantization 8bit with --enable_fsdp: LLM.int8 stores int8 weights, which FSDP cannot "
                          "shard. Use --quantization 4bit under FSDP (its weights are stored in "
                          "--quantization_config.quant_storage, a float dtype), or 8bit in one process.")
    if t.enable_fsdp and cfg.fsdp.fsdp_cpu_offload:
        raise ConfigError("--quantization with --fsdp_config.fsdp_cpu_offload is not supported: bitsandbytes "
                          "quantizes again whenever a 4-bit layer moves between devices. Drop the offload "
                          "(the 4-bit base is already small).")
    if t.peft_method.value != "lora":
        raise ConfigError("--quantization (QLoRA) needs --peft_method lora.")
    if q.quant_type not in ("fp4", "nf4"):
        raise ConfigError(f"--quantization_config.quant_type must be fp4 or nf4, got {q.quant_type!r}.")
    for name in ("compute_dtype", "quant_storage"):
        if getattr(q, name) not in _QUANT_DTYPES:
            raise ConfigError(f"--quantization_config.{name} must be one of {', '.join(_QUANT_DTYPES)}; "
                              f"got {getattr(q, name)!r}.")
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ConfigError("--quantization needs the bitsandbytes package: pip install 'shardtune[qlora]' "
                          "(the official bitsandbytes; it runs 4-bit and 8-bit layers on CUDA and on CPUs).")


def check_family_options(cfg, is_vision: bool, family: str) -> None:
    """Options that the model's family (``model.family.ModelFamily``: whether it is a vision model,
    its name) cannot honour are refused, never silently ignored. It needs the model's config, so it
    runs where that is read (the launcher, for a local model, and every rank), after ``validate``;
    the dataset's own check is ``data.registry``'s."""
    t = cfg.train
    if is_vision and t.batching_strategy.value == "packing":
        raise ShardtuneError(
            f"--batching_strategy packing is not available for vision models ({family}): a packed row "
            "would join several samples' images and text, and each image must stay with its own "
            "text. Pass --batching_strategy padding (as llama-recipes' vision examples do).")
    if is_vision and t.quantization:
        raise ShardtuneError(
            f"--quantization (QLoRA) is not supported for vision models ({family}) yet. Use LoRA "
            "without --quantization (--use_peft --peft_method lora), or --freeze_LLM_only.")
    if is_vision and t.use_peft and t.peft_method.value == "llama_adapter":
        raise ShardtuneError(
            "--peft_method llama_adapter is for text models: peft's LLaMA-Adapter wraps Llama's "
            "self-attention and does not know Llama 3.2 Vision's. Use --peft_method lora.")
    for flag, on in (("--freeze_LLM_only", t.freeze_LLM_only), ("--freeze_vision_tower", t.freeze_vision_tower)):
        if on and not is_vision:
            raise ShardtuneError(
                f"{flag} is for vision models (Llama 3.2 Vision / Mllama), which have a language model and a "
                "vision tower to freeze separately; this model has none. Use --freeze_layers or --use_peft.")
        if on and t.use_peft:  # peft freezes every base weight: the parts the flag keeps would not train
            raise ShardtuneError(
                f"{flag} chooses which base weights train, but --use_peft freezes all of them and trains only "
                "the adapter, so the flag would change nothing. Use one or the other (a LoRA can reach "
                "the vision tower through --lora_config.target_modules with dotted names: docs/vision.md).")
