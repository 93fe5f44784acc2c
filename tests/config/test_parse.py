import pytest
import yaml

from shardtune.config import (
    BatchingStrategy, ConfigError, PeftMethod, ShardingStrategy, StateDictType, parse_args,
)
from shardtune.config.configs import NOT_IMPLEMENTED


SEED_LINE = ("--enable_fsdp --model_name /path/to/8B --use_peft --peft_method lora "
             "--dataset alpaca_dataset --output_dir out --dist_checkpoint_root_folder ckpts "
             "--dist_checkpoint_folder fine-tuned --fsdp_config.pure_bf16 --use_fast_kernels "
             "--low_cpu_fsdp --save_metrics")


def parse(line: str):
    return parse_args(line.split()).config


@pytest.fixture
def all_implemented(monkeypatch):
    """Parse-only tests of flags whose feature has not landed must not trip the not-implemented guard."""
    monkeypatch.setattr("shardtune.config.validate.NOT_IMPLEMENTED", {})


def test_llama_recipes_seed_command_line_parses(all_implemented):
    c = parse(SEED_LINE)
    assert c.train.enable_fsdp and c.train.use_peft and c.train.low_cpu_fsdp and c.train.save_metrics
    assert c.train.peft_method is PeftMethod.lora
    assert c.train.dataset == "alpaca_dataset"
    assert c.train.model_name == "/path/to/8B"
    assert c.fsdp.pure_bf16 is True
    assert c.train.dist_checkpoint_folder == "fine-tuned"


def test_defaults_match_llama_recipes():
    c = parse("")
    t = c.train
    assert (t.batch_size_training, t.context_length, t.num_epochs, t.lr, t.gamma, t.seed) == (4, 4096, 3, 1e-4, 0.85, 42)
    assert t.batching_strategy is BatchingStrategy.packing and t.run_validation and t.save_model
    assert t.dataset == "samsum_dataset" and t.val_batch_size == 1 and t.flop_counter_start == 3
    assert c.fsdp.sharding_strategy is ShardingStrategy.FULL_SHARD
    assert c.fsdp.checkpoint_type is StateDictType.SHARDED_STATE_DICT
    assert c.fsdp.fsdp_activation_checkpointing and c.fsdp.mixed_precision
    assert (c.lora.r, c.lora.lora_alpha, c.lora.target_modules, c.lora.lora_dropout) == (8, 32, ["q_proj", "v_proj"], 0.05)
    assert (c.llama_adapter.adapter_len, c.llama_adapter.adapter_layers) == (10, 30)


@pytest.mark.parametrize("line", ["--lr 2e-5", "--lr=2e-5", "lr=2e-5", "train_config.lr=2e-5",
                                  "--train_config.lr 2e-5"])
def test_value_forms(line):
    assert parse(line).train.lr == 2e-5


@pytest.mark.parametrize("line,expected", [
    ("--run_validation", True), ("--run_validation false", False), ("--run_validation=False", False),
    ("--norun_validation", False), ("--run_validation 0", False), ("run_validation=yes", True)])
def test_bool_forms(line, expected):
    assert parse(line).train.run_validation is expected


def test_bare_bool_followed_by_another_flag():
    c = parse("--save_metrics --lr 3e-4")
    assert c.train.save_metrics and c.train.lr == 3e-4


def test_enum_and_dotted_sections(all_implemented):
    c = parse("--enable_fsdp --fsdp_config.sharding_strategy HYBRID_SHARD --fsdp_config.hsdp "
              "--fsdp_config.sharding_group_size 2 --fsdp_config.checkpoint_type FULL_STATE_DICT")
    assert c.fsdp.sharding_strategy is ShardingStrategy.HYBRID_SHARD and c.fsdp.hsdp
    assert c.fsdp.sharding_group_size == 2 and c.fsdp.checkpoint_type is StateDictType.FULL_STATE_DICT
    # llama-recipes' repr form is accepted too
    assert parse("--enable_fsdp --fsdp_config.sharding_strategy ShardingStrategy.SHARD_GRAD_OP").fsdp.sharding_strategy \
        is ShardingStrategy.SHARD_GRAD_OP


def test_flat_names_route_to_every_owner():
    c = parse("--mixed_precision false --pure_bf16 --r 16 --target_modules q_proj,k_proj,v_proj")
    assert c.train.mixed_precision is False and c.fsdp.mixed_precision is False
    assert c.fsdp.pure_bf16 and c.lora.r == 16
    assert c.lora.target_modules == ["q_proj", "k_proj", "v_proj"]
    assert parse("--lora_config.target_modules [q_proj,o_proj]").lora.target_modules == ["q_proj", "o_proj"]


def test_dataset_fields_flat_and_dotted():
    c = parse("--dataset alpaca_dataset --data_path my.json")
    assert c.dataset_config.data_path == "my.json"
    c = parse("--dataset grammar_dataset --grammar_dataset.train_split train.csv")
    assert c.dataset_config.train_split == "train.csv"
    # flat dataset fields follow the *final* dataset choice, wherever --dataset appears
    c = parse("--file my.py:get_ds --dataset custom_dataset")
    assert c.dataset_config.file == "my.py:get_ds"
    assert parse("--custom_dataset.file my.py:get_ds").datasets["custom_dataset"].file == "my.py:get_ds"


def test_yaml_config_and_overrides(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({
        "model_name": "m", "lr": 1e-3, "batching_strategy": "padding",
        "lora_config": {"r": 4}, "alpaca_dataset": {"data_path": "a.json"}, "dataset": "alpaca_dataset"}))
    c = parse(f"--config {path} lr=5e-4 --lora_config.r 2")
    assert c.train.model_name == "m" and c.train.lr == 5e-4 and c.lora.r == 2
    assert c.train.batching_strategy is BatchingStrategy.padding
    assert c.dataset_config.data_path == "a.json"


def test_print_config_round_trips(tmp_path, capsys):
    from shardtune.finetuning import main as finetune_main

    finetune_main(["--lr", "7e-5", "--dataset", "alpaca_dataset", "--print-config"])
    text = capsys.readouterr().out
    dumped = yaml.safe_load(text)
    assert dumped["train_config"]["lr"] == 7e-5 and "alpaca_dataset" in dumped
    path = tmp_path / "resolved.yaml"
    path.write_text(text)
    assert parse(f"--config {path}").train.lr == 7e-5


@pytest.mark.parametrize("line,message", [
    ("--lrr 1", "Did you mean --lr?"),
    ("--fsdp_config.pure_bf61", "Did you mean --fsdp_config.pure_bf16?"),
    ("--batch_size_training four", "expects an integer"),
    ("--batch_size_training 2.5", "expects an integer"),
    ("--lr fast", "expects a number"),
    ("--fsdp_config.sharding_strategy HALF_SHARD", "must be one of FULL_SHARD"),
    ("--run_validation maybe", "Unexpected argument"),
    ("--batching_strategy pack", "must be one of padding, packing"),
    ("--dataset alpaca", "Did you mean alpaca_dataset?"),
    ("--file x.py", "selected dataset is 'samsum_dataset'"),
    ("--lr", "needs a value"),
    ("--nosuch_section.lr 1", "Unknown option"),
    ("stray", "Unexpected argument"),
    ("--config missing.yaml", "does not exist"),
])
def test_errors_are_clear(line, message):
    with pytest.raises(ConfigError, match=message.replace("?", r"\?").replace("[", r"\[")):
        parse(line)


@pytest.mark.parametrize("line,message", [
    ("--batch_size_training 0", "at least 1"),
    ("--flop_counter --use_profiler", "cannot be used together"),
    ("--use_fp16 --pure_bf16", "choose one"),
    ("--fsdp_config.hsdp", "needs --fsdp_config.sharding_strategy HYBRID_SHARD"),
    ("--fsdp_config.optimizer sgd", "AdamW or anyprecision"),
    ("--from_peft_checkpoint adapter", "needs --use_peft"),
    ("--freeze_layers --use_peft", "Use one of them"),
])
def test_invalid_combinations(line, message):
    with pytest.raises(ConfigError, match=message):
        parse(line)


def test_an_option_whose_feature_has_not_landed_is_refused_not_ignored(monkeypatch):
    """The guard itself (NOT_IMPLEMENTED is empty while every llama-recipes option works)."""
    monkeypatch.setattr("shardtune.config.validate.NOT_IMPLEMENTED", {"train_config.flop_counter": "a test"})
    with pytest.raises(ConfigError, match="not implemented"):
        parse("--flop_counter")
    assert NOT_IMPLEMENTED == {}


@pytest.mark.parametrize("flags,message", [
    (["--low_cpu_fsdp"], "--low_cpu_fsdp only applies with --enable_fsdp"),
    (["--fsdp_config.sharding_strategy", "NO_SHARD"], "only applies with --enable_fsdp"),
    (["--fsdp_config.fsdp_cpu_offload"], "only applies with --enable_fsdp"),
    (["--enable_fsdp", "--low_cpu_fsdp", "--use_peft", "--lora_config.use_dora"], "with --low_cpu_fsdp"),
    (["--enable_fsdp", "--fsdp_config.sharding_group_size", "-1"], "must be 0"),
])
def test_fsdp_options_are_refused_where_they_would_be_ignored(flags, message):
    with pytest.raises(ConfigError, match=message):
        parse_args(flags)


def test_every_sharding_strategy_is_selectable_from_the_command_line():
    for name in ("FULL_SHARD", "SHARD_GRAD_OP", "NO_SHARD", "HYBRID_SHARD"):
        cfg = parse_args(["--enable_fsdp", "--fsdp_config.sharding_strategy", name]).config
        assert cfg.fsdp.sharding_strategy.value == name


def test_adapter_options_ignored_by_from_peft_checkpoint_are_refused():
    with pytest.raises(ConfigError, match="--lora_config.r was set, but --from_peft_checkpoint"):
        parse("--use_peft --from_peft_checkpoint adapter-dir --lora_config.r 16")
    assert parse("--use_peft --from_peft_checkpoint adapter-dir").train.from_peft_checkpoint == "adapter-dir"
