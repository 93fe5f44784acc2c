"""``shardtune data``: see exactly what a training run would train on, without training.

    shardtune data [training flags] [--show N|all] [--json] [--split train|test]

The training flags are ``shardtune finetune``'s (parsed and validated by the same parser; a YAML
``--config`` and ``key=value`` overrides work too), and the data is loaded the way the recipe
loads it: the same tokenizer (the model's, or ``--tokenizer_name``; a vision model's processor),
the same split, ``--context_length`` / ``--overlong`` / ``--skip_bad_rows``, the same model-family
checks and the same training loader refusals. No model weights are read and nothing is written.
torchrun's launch options are accepted and change nothing (every rank trains on the same set of
samples).

  --show N|all      print the first N samples of the split, in dataset order (default 3)
  --json            one JSON object per sample and line on stdout, nothing else there:
                    {"input_ids": [...], "labels": [...]} (labels -100 where not trained; vision
                    samples add "images", their image count); the summary goes to stderr
  --split S         train (default) or test (the eval split --run_validation uses)

Without --json: a summary (rows read, samples, bad rows, dropped, truncated, tokens, trained
tokens), then each sample's text with its trained tokens in green on a terminal, or between [[ and
]] anywhere else (a file, a pipe, or NO_COLOR set), and its token counts. Samples are shown as the
loader yields each one alone, before padding or packing.
"""

from __future__ import annotations

import contextlib
import os
import sys
from dataclasses import dataclass
from typing import Optional, Sequence

import yaml

from ..config import ConfigError, describe_options, parse_args
from ..config.parse import Config

DEFAULT_SHOW = 3
SPLITS = ("train", "test")
_VALUED = ("show", "split")


@dataclass
class ViewOptions:
    show: Optional[int] = DEFAULT_SHOW  # None: all
    json: bool = False
    split: str = "train"


def split_view_args(argv: Sequence[str]) -> tuple[ViewOptions, list[str]]:
    """Pull ``--show``, ``--json`` and ``--split`` out of ``argv``; the rest are training flags."""
    opts, rest = ViewOptions(), []
    args, i = list(argv), 0
    while i < len(args):
        tok = args[i]
        name, eq, value = tok[2:].partition("=") if tok.startswith("--") else ("", "", "")
        if name == "json" and not eq:
            opts.json = True
        elif name in _VALUED:
            if not eq:
                if i + 1 >= len(args) or args[i + 1].startswith("--"):
                    raise ConfigError(f"--{name} needs a value (for example --{name} "
                                      f"{'3' if name == 'show' else 'train'}).")
                value = args[i + 1]
                i += 1
            if name == "show":
                opts.show = _count(value)
            else:
                if value not in SPLITS:
                    raise ConfigError(f"--split must be train or test, got {value!r}.")
                opts.split = value
        else:
            rest.append(tok)
        i += 1
    return opts, rest


def _count(value: str) -> Optional[int]:
    if value == "all":
        return None
    if not value.isdigit():
        raise ConfigError(f"--show takes a number of samples (0 or more) or 'all', got {value!r}.")
    return int(value)


@dataclass
class LoadedData:
    split: object        # TokenizedSplit
    tokenizer: object    # a vision model's processor
    image_token: Optional[int]
    batching: str
    other: Optional[str]  # the report of the other split training loads, if it loads one


def load_data(cfg: Config, split_name: str) -> LoadedData:
    """The split as the recipe loads it (``finetuning.setup`` and ``setup_data``): seeded, the model
    family's option checks, its tokenizer or processor, ``load_split``, and the loaders built (not
    iterated) so that their refusals are training's. The train split is always loaded, the test
    split with ``--run_validation`` (as training does) or when it is the one shown."""
    from ..family_checks import refuse_for_family
    from ..model.family import family_for_config
    from ..model.loading import load_config, load_inputs
    from ..runtime import set_seed
    from .images import image_token_id
    from .registry import load_split
    from .training import build_eval_loader, build_train_loader

    t = cfg.train
    set_seed(t.seed)  # a custom dataset file may draw from the global generators, as in training
    family = family_for_config(load_config(t.model_name))
    refuse_for_family(cfg, family)
    tokenizer = load_inputs(t.model_name, t.tokenizer_name)
    required = family.required_batch_keys
    splits, loaders = {}, {}
    splits["train"] = load_split(cfg, tokenizer, "train")
    loaders["train"] = build_train_loader(cfg, splits["train"], tokenizer, required_keys=required, num_workers=0)
    if t.run_validation or split_name == "test":
        splits["test"] = load_split(cfg, tokenizer, "test")
        loaders["test"] = build_eval_loader(cfg, splits["test"], tokenizer, required_keys=required, num_workers=0)
    size = t.batch_size_training if split_name == "train" else t.val_batch_size
    before = "packing into chunks of --context_length tokens" if t.batching_strategy.value == "packing" else "padding"
    batching = (f"{t.batching_strategy.value}: {len(loaders[split_name]):,} batches of {size} per epoch on one rank; "
                f"samples are shown before {before}")
    other = next((s.report.summary() for name, s in splits.items() if name != split_name), None)
    return LoadedData(splits[split_name], tokenizer, image_token_id(tokenizer) if family.uses_processor else None,
                      batching, other)


def main(argv: Optional[Sequence[str]] = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if any(a in ("-h", "--help") for a in argv):
        print(__doc__)
        return
    from ..parallel.launch import split_launch_args

    opts, rest = split_view_args(argv)
    _launch, rest = split_launch_args(rest)  # accepted: the samples do not depend on the ranks
    parsed = parse_args(rest)
    if parsed.help_config:
        print(describe_options())
        return
    if parsed.print_config:
        print(yaml.safe_dump(parsed.config.to_dict(), sort_keys=False), end="")
        return
    from ..model.loading import text_tokenizer
    from . import show

    out = sys.stdout
    # stdout is the view's alone: whatever loading prints (a custom dataset file, a library) goes to stderr
    with contextlib.redirect_stdout(sys.stderr):
        data = load_data(parsed.config, opts.split)
        split = data.split
        n = len(split.samples) if opts.show is None else min(opts.show, len(split.samples))
        samples = [show.sample_tokens(split, k, data.image_token) for k in range(n)]
        counts = show.count(split, data.image_token)
    colour = not opts.json and out.isatty() and not os.environ.get("NO_COLOR")  # else brackets
    tokenizer_source = parsed.config.train.tokenizer_name or parsed.config.train.model_name
    lines = show.summary(split, counts, dataset=parsed.config.train.dataset, tokenizer_source=tokenizer_source,
                         batching=data.batching, colour=None if opts.json else colour,
                         other_split=data.other)
    try:
        if opts.json:
            print("\n".join(lines), file=sys.stderr, flush=True)
            for sample in samples:
                out.write(sample.to_json() + "\n")
        else:
            tokenizer = text_tokenizer(data.tokenizer)
            out.write("\n".join(lines) + "\n")
            for k, sample in enumerate(samples):
                text = show.render(sample, tokenizer, colour)
                out.write(f"\n{show.header(k, show.where(split, k), sample)}\n{text}\n")
        out.flush()
    except BrokenPipeError:  # `shardtune data ... | head`: the reader has what it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), out.fileno())  # no second error when Python flushes at exit
