"""The llama-recipes configuration surface, field for field, plus shardtune's additions.

Class and field names match llama-recipes (``train_config``, ``fsdp_config``, ...) so that
existing command lines and YAML files keep their meaning. Every field carries a type that the
parser enforces; fields marked in ``NOT_IMPLEMENTED`` are refused when set instead of being
silently ignored.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import List, Optional


class ShardingStrategy(str, enum.Enum):
    """llama-recipes' FSDP1 names; ``shardtune.parallel`` maps them onto FSDP2."""

    FULL_SHARD = "FULL_SHARD"
    SHARD_GRAD_OP = "SHARD_GRAD_OP"
    NO_SHARD = "NO_SHARD"
    HYBRID_SHARD = "HYBRID_SHARD"


class StateDictType(str, enum.Enum):
    SHARDED_STATE_DICT = "SHARDED_STATE_DICT"
    FULL_STATE_DICT = "FULL_STATE_DICT"


class BatchingStrategy(str, enum.Enum):
    padding = "padding"
    packing = "packing"


class PeftMethod(str, enum.Enum):
    lora = "lora"
    llama_adapter = "llama_adapter"


class Scheduler(str, enum.Enum):
    steplr = "steplr"  # llama-recipes: lr *= gamma after every epoch
    cosine = "cosine"
    linear = "linear"
    constant = "constant"


class OverlongPolicy(str, enum.Enum):
    truncate = "truncate"
    drop = "drop"


class ChatTrainOn(str, enum.Enum):
    assistant = "assistant"  # every assistant turn (its content, tool calls and end-of-turn token)
    last = "last"  # only the conversation's final assistant turn
    all = "all"  # every token of the conversation


class Device(str, enum.Enum):
    auto = "auto"
    cpu = "cpu"
    cuda = "cuda"


class LossImpl(str, enum.Enum):
    plain = "plain"  # transformers' way: full-vocabulary logits for the whole batch, then the loss
    chunked = "chunked"  # the head and the loss a chunk of label tokens at a time (train/loss.py)


class CheckpointingPolicy(str, enum.Enum):
    """Which activations --fsdp_config.fsdp_activation_checkpointing recomputes (parallel/activation_checkpointing.py)."""

    full = "full"  # every decoder layer
    every_k = "every_k"  # every k-th decoder layer (--activation_checkpointing_every_k)
    ops = "ops"  # every layer, but matmul and attention outputs are kept: only cheap ops are recomputed


class GradientSync(str, enum.Enum):
    """When FSDP reduces gradients with --gradient_accumulation_steps > 1 (defers_gradient_sync)."""

    auto = "auto"  # every_micro_batch for full-parameter training with a sharded strategy, else last_micro_batch
    every_micro_batch = "every_micro_batch"  # reduce-scatter after each backward: only sharded gradients are kept
    last_micro_batch = "last_micro_batch"  # reduce once per step: fewer collectives, unsharded gradients held


class PreferenceLoss(str, enum.Enum):
    """--dpo_config.loss_type (train/dpo.py)."""

    sigmoid = "sigmoid"  # DPO (Rafailov et al. 2023), with optional label smoothing (cDPO)
    ipo = "ipo"  # IPO (Azar et al. 2023): squared distance of the per-token log-ratio margin from 1/(2 beta)


class OptimizerImpl(str, enum.Enum):
    auto = "auto"  # fused where the device has the kernel (CUDA, CPU), else foreach
    fused = "fused"
    foreach = "foreach"
    for_loop = "for_loop"


@dataclass
class train_config:
    model_name: str = "PATH/to/Model"
    tokenizer_name: Optional[str] = None
    enable_fsdp: bool = False
    low_cpu_fsdp: bool = False
    run_validation: bool = True
    batch_size_training: int = 4
    batching_strategy: BatchingStrategy = BatchingStrategy.packing
    context_length: int = 4096
    gradient_accumulation_steps: int = 1
    gradient_clipping: bool = False
    gradient_clipping_threshold: float = 1.0
    num_epochs: int = 3
    max_train_step: int = 0
    max_eval_step: int = 0
    num_workers_dataloader: int = 1
    lr: float = 1e-4
    weight_decay: float = 0.0
    gamma: float = 0.85
    seed: int = 42
    use_fp16: bool = False
    mixed_precision: bool = True
    val_batch_size: int = 1
    dataset: str = "samsum_dataset"
    peft_method: PeftMethod = PeftMethod.lora
    use_peft: bool = False
    from_peft_checkpoint: str = ""
    output_dir: str = "PATH/to/save/PEFT/model"
    freeze_layers: bool = False
    num_freeze_layers: int = 1
    freeze_LLM_only: bool = False
    freeze_vision_tower: bool = False  # vision models: freeze the vision encoder and projector, train the LLM
    quantization: Optional[str] = None  # "4bit" | "8bit": QLoRA base through bitsandbytes (needs --use_peft)
    one_gpu: bool = False
    save_model: bool = True
    dist_checkpoint_root_folder: str = "PATH/to/save/FSDP/model"
    dist_checkpoint_folder: str = "fine-tuned"
    save_optimizer: bool = False
    use_fast_kernels: bool = False
    use_wandb: bool = False
    save_metrics: bool = False
    flop_counter: bool = False
    flop_counter_start: int = 3
    use_profiler: bool = False
    profiler_dir: str = "PATH/to/save/profiler/results"
    # --- shardtune additions ---
    device: Device = Device.auto  # auto: cuda when available, else cpu
    scheduler: Scheduler = Scheduler.steplr
    warmup_steps: int = 0  # linear warm-up (optimizer steps) before the scheduler takes over
    skip_bad_rows: bool = False  # malformed dataset rows: stop (default) or skip with a count
    overlong: OverlongPolicy = OverlongPolicy.truncate  # examples longer than context_length
    eval_fraction: float = 0.05  # held-out slice for datasets without a test split (alpaca)
    # MFU's denominator, TFLOP/s per device (default: a known GPU's data-sheet figure in the compute
    # dtype, else a GEMM measured at start-up; train/peak.py)
    peak_tflops: Optional[float] = None
    use_tensorboard: bool = False  # the metrics as TensorBoard scalars (pip install 'shardtune[tensorboard]')
    tensorboard_dir: str = ""  # default: <output_dir>/tensorboard
    save_every_n_steps: int = 0
    keep_last_n: int = 0
    resume: bool = False
    resume_from: str = ""
    export_dtype: Optional[str] = None
    merge_lora: bool = False
    # write into an output_dir holding files shardtune did not write (they are left in place)
    overwrite_output_dir: bool = False
    # a step with a NaN/inf loss or gradient norm: stop (default) or skip it without an update
    skip_nonfinite_steps: bool = False
    # after training: loss, perplexity and answer exact match of the saved model on the eval split,
    # added to metrics.json (shardtune.eval.quick; docs/evaluation.md)
    run_eval_after: bool = False
    # next-token loss: chunked (never holds the whole batch's fp32 logits; as fast on the benchmark
    # models here, docs/training.md) or plain (transformers' way)
    loss: LossImpl = LossImpl.chunked
    loss_chunk_tokens: int = 1024  # label tokens per chunk of --loss chunked
    compile: bool = False  # torch.compile each decoder layer (after activation checkpointing, before FSDP)
    optimizer_impl: OptimizerImpl = OptimizerImpl.auto  # AdamW's implementation (not anyprecision's)
    # preference tuning (DPO / IPO, --dpo_config.*) on --dataset preference_dataset (docs/preference.md)
    use_dpo: bool = False


@dataclass
class fsdp_config:
    mixed_precision: bool = True
    use_fp16: bool = False
    sharding_strategy: ShardingStrategy = ShardingStrategy.FULL_SHARD
    hsdp: bool = False
    sharding_group_size: int = 0
    replica_group_size: int = 0
    checkpoint_type: StateDictType = StateDictType.SHARDED_STATE_DICT
    fsdp_activation_checkpointing: bool = True
    fsdp_cpu_offload: bool = False
    pure_bf16: bool = False
    optimizer: str = "AdamW"
    # --- shardtune additions (activation memory; docs/training.md) ---
    activation_checkpointing_policy: CheckpointingPolicy = CheckpointingPolicy.full
    activation_checkpointing_every_k: int = 2  # with policy every_k: layers 0, k, 2k, ... are checkpointed
    activation_offload: bool = False  # keep the activations saved for backward in pinned CPU memory (GPU only)
    gradient_sync: GradientSync = GradientSync.auto  # with gradient accumulation: reduce every micro-batch or once


@dataclass
class lora_config:
    r: int = 8
    lora_alpha: int = 32
    target_modules: List[str] = field(default_factory=lambda: ["q_proj", "v_proj"])
    bias: str = "none"
    task_type: str = "CAUSAL_LM"
    lora_dropout: float = 0.05
    inference_mode: bool = False
    # --- peft options llama-recipes' lora_config lacks (shardtune additions) ---
    modules_to_save: Optional[List[str]] = None  # modules trained in full next to the adapter (e.g. lm_head)
    use_rslora: bool = False  # rank-stabilised scaling lora_alpha / sqrt(r)
    use_dora: bool = False  # weight-decomposed LoRA (not with --low_cpu_fsdp or --merge_lora)


@dataclass
class llama_adapter_config:
    adapter_len: int = 10
    adapter_layers: int = 30
    task_type: str = "CAUSAL_LM"


@dataclass
class quantization_config:
    quant_type: str = "fp4"  # "fp4" or "nf4"
    compute_dtype: str = "bfloat16"
    use_double_quant: bool = False
    quant_storage: str = "bfloat16"


@dataclass
class dpo_config:
    """--use_dpo: the preference loss (train/dpo.py, docs/preference.md)."""

    beta: float = 0.1  # strength of the pull towards the reference model
    loss_type: PreferenceLoss = PreferenceLoss.sigmoid
    label_smoothing: float = 0.0  # sigmoid only: the assumed share of pairs whose labels are flipped (cDPO)
    # the reference's log-probabilities of every pair computed in one pass before training (no frozen
    # copy of a full-parameter model is kept, and no reference forward runs per step)
    precompute_reference: bool = False


@dataclass
class wandb_config:
    project: str = "llama_recipes"
    entity: Optional[str] = None
    job_type: Optional[str] = None
    tags: Optional[List[str]] = None
    group: Optional[str] = None
    notes: Optional[str] = None
    mode: Optional[str] = None


# --- dataset configs (llama-recipes' configs/datasets.py) ---


@dataclass
class samsum_dataset:
    dataset: str = "samsum_dataset"
    train_split: str = "train"
    test_split: str = "validation"
    trust_remote_code: bool = False
    data_path: str = ""  # shardtune: a local json/jsonl/parquet/csv file or folder instead of the hub


@dataclass
class grammar_dataset:
    dataset: str = "grammar_dataset"
    train_split: str = "datasets/grammar_dataset/gtrain_10k.csv"
    test_split: str = "datasets/grammar_dataset/grammar_validation.csv"


@dataclass
class alpaca_dataset:
    dataset: str = "alpaca_dataset"
    train_split: str = "train"
    test_split: str = "val"
    data_path: str = "datasets/alpaca_data.json"


@dataclass
class custom_dataset:
    dataset: str = "custom_dataset"
    file: str = "custom_dataset.py"
    train_split: str = "train"
    test_split: str = "validation"
    data_path: str = ""


@dataclass
class ocrvqa_dataset:
    """the_cauldron-style image + conversation rows (llama-recipes' OCR-VQA vision example);
    see data/vision.py. Needs a vision model's processor and --batching_strategy padding."""
    dataset: str = "ocrvqa_dataset"
    data_path: str = ""  # a local .jsonl/.json/.parquet file or a saved `datasets` folder; empty: the hub
    hub_name: str = "HuggingFaceM4/the_cauldron"
    subset: str = "ocrvqa"
    train_split: str = "train"  # a DatasetDict's split to train on; divided by split_ratio if alone
    test_split: str = "test"  # used as it is when the DatasetDict has both splits
    split_ratio: float = 0.9  # share of the rows in the train split when the source has one split
    max_rows: int = 0  # use only the first N rows of the source (of each split), before splitting (0: all)


@dataclass
class chat_dataset:
    """Multi-turn conversations (OpenAI ``messages`` or ShareGPT ``conversations`` rows) rendered
    with the chat template and trained on the assistant turns; see data/chat_dataset.py."""
    dataset: str = "chat_dataset"
    data_path: str = ""  # a .json/.jsonl/.parquet file, a folder of <split>.<ext> files, or a hub dataset name
    train_split: str = "train"  # folder / hub: the split to train on
    test_split: str = "test"  # folder / hub: the eval split; "": the first eval_fraction of the train split
    subset: str = ""  # hub: the dataset's configuration name
    chat_template: str = ""  # a Jinja file rendering the conversations (and saved with the model); "": the tokenizer's
    train_on: ChatTrainOn = ChatTrainOn.assistant  # which tokens carry labels: assistant | last | all
    cut_at_turn: bool = False  # over-long conversations: keep the whole turns that fit (system message kept)


@dataclass
class preference_dataset:
    """Preference pairs for --use_dpo (data/preference.py): rows {prompt, chosen, rejected}, strings
    or chat message lists. The eval split is the first --eval_fraction of the rows (as alpaca)."""
    dataset: str = "preference_dataset"
    data_path: str = ""  # a .json (list) / .jsonl / .parquet file


DATASET_CONFIGS = {
    "samsum_dataset": samsum_dataset,
    "grammar_dataset": grammar_dataset,
    "alpaca_dataset": alpaca_dataset,
    "custom_dataset": custom_dataset,
    "ocrvqa_dataset": ocrvqa_dataset,
    "chat_dataset": chat_dataset,
    "preference_dataset": preference_dataset,
}

# Sections addressable as ``--<section>.<field>`` / YAML sub-mappings.
SECTIONS = {
    "train_config": train_config,
    "fsdp_config": fsdp_config,
    "lora_config": lora_config,
    "llama_adapter_config": llama_adapter_config,
    "quantization_config": quantization_config,
    "wandb_config": wandb_config,
    "dpo_config": dpo_config,
    **DATASET_CONFIGS,
}

# Fields that parse but whose feature has not landed yet. Setting one to a non-default value
# is an error (llama-recipes would silently ignore it). Remove an entry when its feature lands.
NOT_IMPLEMENTED: dict[str, str] = {}


def defers_gradient_sync(train: train_config, fsdp: fsdp_config) -> bool:
    """Whether gradient accumulation under FSDP reduces gradients once per optimizer step (True)
    instead of after every micro-batch's backward (False): ``--fsdp_config.gradient_sync``.

    Deferring saves the collectives of all but the last micro-batch, but FSDP2 then holds an
    unsharded fp32 gradient of every trainable parameter on every rank until the step ends: for
    full-parameter training that is 4 bytes per parameter of the whole model (280 GB for 70B),
    which defeats the sharding. So ``auto`` defers only where that costs little: NO_SHARD (every
    rank holds whole gradients anyway) and adapter training (the trainable set is usually small;
    LoRA on the head or embeddings and ``modules_to_save`` make it larger, and the planner counts
    it). Reducing every micro-batch is llama-recipes', torchtune's and torchtitan's way; it sums
    the reduced micro-batch gradients in the sharded gradient's dtype, which is bf16 under
    ``--fsdp_config.pure_bf16`` (deferring sums them in fp32, as the unsharded gradients are).
    """
    if fsdp.gradient_sync is not GradientSync.auto:
        return fsdp.gradient_sync is GradientSync.last_micro_batch
    return fsdp.sharding_strategy is ShardingStrategy.NO_SHARD or train.use_peft
