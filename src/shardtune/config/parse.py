"""Command line, YAML and ``key=value`` overrides -> a typed, validated :class:`Config`.

Accepted forms (llama-recipes' command lines run unchanged):

* ``--lr 2e-5`` / ``--lr=2e-5``; a bare boolean flag ``--enable_fsdp`` means True,
  ``--enable_fsdp false`` and ``--noenable_fsdp`` mean False;
* ``--fsdp_config.pure_bf16``, ``--fsdp_config.sharding_strategy HYBRID_SHARD``;
* ``--alpaca_dataset.data_path data.json`` (any ``--<section>.<field>``);
* flat names are routed to every config that owns them (``--mixed_precision`` sets both
  train_config and fsdp_config, as llama-recipes does); flat dataset fields go to the selected
  dataset's config;
* ``--config run.yaml`` (repeatable) and bare ``key=value`` / ``section.key=value`` overrides.

Later assignments win: YAML files first, then flags and overrides in command-line order.
"""

from __future__ import annotations

import dataclasses
import difflib
import enum
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import yaml

from .configs import (
    DATASET_CONFIGS,
    SECTIONS,
    fsdp_config,
    llama_adapter_config,
    lora_config,
    dpo_config,
    quantization_config,
    train_config,
    wandb_config,
)
from .errors import ConfigError

# Sections whose fields may be given without a ``section.`` prefix. Dataset sections are
# handled separately: a flat dataset field goes to the *selected* dataset.
_FLAT_SECTIONS = ("train_config", "fsdp_config", "lora_config", "llama_adapter_config",
                  "quantization_config", "wandb_config", "dpo_config")
# Flat names that belong to one section only even though another section has a same-named
# field: ``--dataset`` selects the dataset, it does not rename a dataset config.
_FLAT_EXCLUDE = {("samsum_dataset", "dataset"), ("grammar_dataset", "dataset"),
                 ("alpaca_dataset", "dataset"), ("custom_dataset", "dataset"),
                 ("chat_dataset", "dataset"), ("preference_dataset", "dataset")}
_TRUE = {"true", "yes", "1", "on", "y", "t"}
_FALSE = {"false", "no", "0", "off", "n", "f"}
_NONE = {"none", "null", "~", ""}


@dataclass
class Config:
    """Every config section of one run. ``dataset_config`` is the one ``train.dataset`` selects."""

    train: train_config = field(default_factory=train_config)
    fsdp: fsdp_config = field(default_factory=fsdp_config)
    lora: lora_config = field(default_factory=lora_config)
    llama_adapter: llama_adapter_config = field(default_factory=llama_adapter_config)
    quantization: quantization_config = field(default_factory=quantization_config)
    wandb: wandb_config = field(default_factory=wandb_config)
    dpo: dpo_config = field(default_factory=dpo_config)
    datasets: dict = field(default_factory=lambda: {k: v() for k, v in DATASET_CONFIGS.items()})

    @property
    def dataset_config(self) -> Any:
        return self.datasets[self.train.dataset]

    def section(self, name: str) -> Any:
        attr = {"train_config": "train", "fsdp_config": "fsdp", "lora_config": "lora",
                "llama_adapter_config": "llama_adapter", "quantization_config": "quantization",
                "wandb_config": "wandb", "dpo_config": "dpo"}.get(name)
        return getattr(self, attr) if attr else self.datasets[name]

    def to_dict(self, all_datasets: bool = False) -> dict:
        """Nested plain dict (enums as strings) in the YAML layout ``--config`` reads."""
        out = {"train_config": _plain(self.train)}
        for name in _FLAT_SECTIONS[1:]:
            out[name] = _plain(self.section(name))
        names = DATASET_CONFIGS if all_datasets else [self.train.dataset]
        for name in names:
            if name in self.datasets:
                out[name] = _plain(self.datasets[name])
        return out


def _plain(obj: Any) -> dict:
    result = {}
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        result[f.name] = value.value if isinstance(value, enum.Enum) else value
    return result


# ---------------------------------------------------------------- type conversion


def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def convert_value(raw: Any, typ: Any, flag: str) -> Any:
    """Convert ``raw`` (a string from the command line, or a YAML value) to ``typ``."""
    origin = typing.get_origin(typ)
    args = typing.get_args(typ)
    if origin is typing.Union and type(None) in args:  # Optional[X]
        if raw is None or (isinstance(raw, str) and raw.strip().lower() in _NONE):
            return None
        inner = [a for a in args if a is not type(None)][0]
        return convert_value(raw, inner, flag)
    if origin in (list, typing.List):
        (inner,) = args or (str,)
        if isinstance(raw, str):
            text = raw.strip()
            if text.startswith("[") and text.endswith("]"):
                text = text[1:-1]
            items = [s.strip().strip("'\"") for s in text.split(",") if s.strip()]
        elif isinstance(raw, (list, tuple)):
            items = list(raw)
        else:
            raise ConfigError(f"{flag} expects a list (for example a,b,c), got {raw!r}.")
        return [convert_value(item, inner, flag) for item in items]
    if isinstance(typ, type) and issubclass(typ, enum.Enum):
        text = raw.value if isinstance(raw, enum.Enum) else str(raw)
        text = text.split(".")[-1]  # accept "ShardingStrategy.FULL_SHARD"
        for member in typ:
            if member.value.lower() == text.lower():
                return member
        choices = ", ".join(m.value for m in typ)
        raise ConfigError(f"{flag} must be one of {choices}; got {raw!r}.")
    if typ is bool:
        if isinstance(raw, bool):
            return raw
        text = str(raw).strip().lower()
        if text in _TRUE:
            return True
        if text in _FALSE:
            return False
        raise ConfigError(f"{flag} is a yes/no flag; got {raw!r} (use true or false).")
    if typ is int:
        if isinstance(raw, bool):
            raise ConfigError(f"{flag} expects an integer, got {raw!r}.")
        if isinstance(raw, int):
            return raw
        try:
            as_float = float(str(raw))
        except ValueError:
            raise ConfigError(f"{flag} expects an integer, got {raw!r}.") from None
        if not as_float.is_integer():
            raise ConfigError(f"{flag} expects an integer, got {raw!r}.")
        return int(as_float)
    if typ is float:
        if isinstance(raw, bool):
            raise ConfigError(f"{flag} expects a number, got {raw!r}.")
        try:
            value = float(raw)
        except (TypeError, ValueError):
            raise ConfigError(f"{flag} expects a number, got {raw!r}.") from None
        if not math.isfinite(value):  # nan/inf train a model whose every weight is NaN
            raise ConfigError(f"{flag} must be a finite number, got {raw!r}.")
        return value
    if typ is str:
        if isinstance(raw, (dict, list)):
            raise ConfigError(f"{flag} expects a single value, got {raw!r}.")
        return str(raw)
    raise ConfigError(f"{flag}: unsupported field type {typ!r}.")  # pragma: no cover


# ---------------------------------------------------------------- name resolution


def _all_flag_names() -> list[str]:
    names = set()
    for section, cls in SECTIONS.items():
        for f in dataclasses.fields(cls):
            names.add(f"{section}.{f.name}")
            names.add(f.name)
    return sorted(names)


def _unknown(name: str) -> ConfigError:
    close = difflib.get_close_matches(name, _all_flag_names(), n=3, cutoff=0.6)
    hint = f" Did you mean --{close[0]}?" if close else ""
    more = f" (other close names: {', '.join('--' + c for c in close[1:])})" if len(close) > 1 else ""
    return ConfigError(
        f"Unknown option --{name}.{hint}{more} Run `shardtune finetune --help-config` to list "
        "every option with its type and default.")


def _owners(name: str, dataset: str) -> list[tuple[str, str]]:
    """(section, field) pairs a flag name sets, following llama-recipes' routing."""
    if "." in name:
        section, _, fname = name.partition(".")
        if section not in SECTIONS:
            raise _unknown(name)
        if fname not in {f.name for f in dataclasses.fields(SECTIONS[section])}:
            raise _unknown(name)
        return [(section, fname)]
    owners = [(s, name) for s in _FLAT_SECTIONS
              if name in {f.name for f in dataclasses.fields(SECTIONS[s])}]
    if dataset in DATASET_CONFIGS and (dataset, name) not in _FLAT_EXCLUDE and name in {
            f.name for f in dataclasses.fields(DATASET_CONFIGS[dataset])}:
        owners.append((dataset, name))
    if owners:
        return owners
    elsewhere = [d for d, cls in DATASET_CONFIGS.items()
                 if name in {f.name for f in dataclasses.fields(cls)}]
    if elsewhere:
        raise ConfigError(
            f"--{name} is a field of {', '.join(elsewhere)}, but the selected dataset is "
            f"{dataset!r}. Select that dataset with --dataset, or write --{elsewhere[0]}.{name}.")
    raise _unknown(name)


# ---------------------------------------------------------------- tokenising argv


@dataclass
class ParsedArgs:
    config: Config
    print_config: bool = False
    help_config: bool = False


def _tokenise(argv: Sequence[str]) -> tuple[list[str], list[tuple[str, Any]], bool, bool]:
    """Split argv into YAML paths, ordered (name, raw value) assignments and meta flags."""
    yaml_paths: list[str] = []
    assignments: list[tuple[str, Any]] = []
    print_config = help_config = False
    args = list(argv)
    i = 0
    while i < len(args):
        tok = args[i]
        i += 1
        if tok in ("--print-config", "--print_config"):
            print_config = True
            continue
        if tok in ("--help-config", "--help_config"):
            help_config = True
            continue
        if tok.startswith("--"):
            body = tok[2:]
            if not body:
                raise ConfigError("A bare '--' is not an option. Remove it.")
            name, eq, value = body.partition("=")
            if name == "config":
                if not eq:
                    if i >= len(args):
                        raise ConfigError("--config needs a YAML file path.")
                    value = args[i]
                    i += 1
                yaml_paths.append(value)
                continue
            if eq:
                assignments.append((name, value))
                continue
            # Value-less form: a bool flag (optionally followed by an explicit true/false).
            nxt = args[i] if i < len(args) else None
            looks_like_value = nxt is not None and not nxt.startswith("--") and "=" not in nxt
            if _is_bool_flag(name):
                if looks_like_value and nxt.strip().lower() in _TRUE | _FALSE:
                    assignments.append((name, nxt))
                    i += 1
                else:
                    assignments.append((name, True))
                continue
            if name.startswith("no") and _is_bool_flag(name[2:]):
                assignments.append((name[2:], False))
                continue
            if nxt is None or not looks_like_value and nxt.startswith("--"):
                if not _known_owners(name):  # report a misspelling before "missing value"
                    raise _unknown(name)
                raise ConfigError(f"--{name} needs a value (for example --{name} VALUE).")
            assignments.append((name, nxt))
            i += 1
            continue
        if "=" in tok and not tok.startswith("-"):
            name, _, value = tok.partition("=")
            assignments.append((name.strip(), value))
            continue
        raise ConfigError(
            f"Unexpected argument {tok!r}. Options look like --name value, --name=value, "
            "--section.name value or name=value.")
    return yaml_paths, assignments, print_config, help_config


def _known_owners(name: str) -> list[tuple[str, str]]:
    """Owners of a flag under any dataset selection (the selection is not known while tokenising)."""
    found: list[tuple[str, str]] = []
    for dataset in DATASET_CONFIGS:
        try:
            found.extend(o for o in _owners(name, dataset) if o not in found)
        except ConfigError:
            pass
    return found


def _is_bool_flag(name: str) -> bool:
    owners = _known_owners(name)
    return bool(owners) and all(_field_types(SECTIONS[s])[f] is bool for s, f in owners)


# ---------------------------------------------------------------- YAML


def _yaml_assignments(path: str) -> list[tuple[str, Any]]:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"Config file {path!r} does not exist (or is not a file). Check the path.")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"Config file {path} is not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"Config file {path} must hold a mapping of option names to values.")
    out: list[tuple[str, Any]] = []
    for key, value in data.items():
        if key in SECTIONS and isinstance(value, dict):
            prefix = "" if key == "train_config" else f"{key}."
            out.extend((f"{prefix}{k}", v) for k, v in value.items())
        else:
            out.append((str(key), value))
    return out


# ---------------------------------------------------------------- entry point


def apply_assignments(cfg: Config, assignments: list[tuple[str, Any]]) -> Config:
    """Set each (name, raw value) on ``cfg``; the dataset is resolved from the final value first."""
    dataset = cfg.train.dataset
    for name, value in assignments:
        if name in ("dataset", "train_config.dataset"):
            dataset = str(value)
    if dataset not in DATASET_CONFIGS:
        close = difflib.get_close_matches(dataset, list(DATASET_CONFIGS), n=1)
        hint = f" Did you mean {close[0]}?" if close else ""
        raise ConfigError(
            f"Unknown dataset {dataset!r}.{hint} Available: {', '.join(DATASET_CONFIGS)}. "
            "For your own data use --dataset custom_dataset --custom_dataset.file my_data.py.")
    for name, raw in assignments:
        if name.startswith("train_config."):
            name = name[len("train_config."):]
        for section, fname in _owners(name, dataset):
            typ = _field_types(SECTIONS[section])[fname]
            setattr(cfg.section(section), fname, convert_value(raw, typ, f"--{name}"))
    return cfg


def parse_args(argv: Sequence[str]) -> ParsedArgs:
    """Parse a llama-recipes style command line (plus YAML/overrides) into a validated Config."""
    from .validate import validate

    yaml_paths, assignments, print_config, help_config = _tokenise(argv)
    ordered: list[tuple[str, Any]] = []
    for path in yaml_paths:
        ordered.extend(_yaml_assignments(path))
    ordered.extend(assignments)
    cfg = apply_assignments(Config(), ordered)
    if not help_config:
        validate(cfg)
    return ParsedArgs(cfg, print_config=print_config, help_config=help_config)


def describe_options() -> str:
    """Every option with its type and default, for ``--help-config``."""
    lines = []
    for section, cls in SECTIONS.items():
        lines.append(f"[{section}]")
        hints = _field_types(cls)
        default = cls()
        for f in dataclasses.fields(cls):
            typ = hints[f.name]
            tname = getattr(typ, "__name__", str(typ)).replace("typing.", "")
            if isinstance(typ, type) and issubclass(typ, enum.Enum):
                tname = "|".join(m.value for m in typ)
            value = getattr(default, f.name)
            value = value.value if isinstance(value, enum.Enum) else value
            lines.append(f"  --{section}.{f.name:<30} {tname:<28} default {value!r}")
    return "\n".join(lines)
