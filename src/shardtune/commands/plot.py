"""PNG plots of a run's metrics: loss, perplexity, throughput (tokens/s, MFU) and memory.

Written by ``--save_metrics`` at every save point, and by ``shardtune plot METRICS`` from a
``metrics.json`` or ``metrics.jsonl`` (for example one copied off a cluster)::

    shardtune plot out/metrics.json [--output_dir DIR] [--overwrite]

Drawn with matplotlib's object API on the Agg canvas (no display, and the global pyplot backend
of a notebook that imports shardtune is left alone).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Optional, Sequence

from ..config.errors import ShardtuneError
from ..outputs import ownership
from ..train.metrics import load_metrics
from ..train.plots import plot_metrics, plots_for


def plot_file(metrics: str | Path, output_dir: Optional[str | Path] = None, overwrite: bool = False) -> list[Path]:
    """``shardtune plot``: the plots of a metrics file, beside it or in ``output_dir``. A PNG of
    the same name that shardtune did not write there is refused unless ``overwrite``."""
    metrics = Path(metrics)
    if not metrics.is_file():
        raise ShardtuneError(f"{metrics} is not a file; pass a run's metrics.json or metrics.jsonl.")
    try:
        data = load_metrics(metrics)
    except ValueError as e:
        raise ShardtuneError(str(e)) from None
    names = plots_for(data)
    if not names:
        raise ShardtuneError(f"{metrics} holds no training steps to plot.")
    out = Path(output_dir) if output_dir is not None else metrics.parent
    new_dir = not out.exists()
    mine = ownership.owned(out) if out.is_dir() else set()
    clash = [n for n in names if (out / n).exists() and n not in mine]
    if clash and not overwrite:
        raise ShardtuneError(f"{out} already holds {', '.join(clash)}, which shardtune did not write there; "
                             "pass --overwrite to replace them, or choose another --output_dir.")
    out.mkdir(parents=True, exist_ok=True)
    if new_dir or (out / ownership.MARKER).is_file():  # a folder of ours: the plots are recorded as ours
        ownership.record(out, added=names)
    return plot_metrics(data, out)


def main(argv: Optional[Sequence[str]] = None) -> list[Path]:
    p = argparse.ArgumentParser(prog="shardtune plot", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("metrics", help="a run's metrics.json or metrics.jsonl")
    p.add_argument("--output_dir", default=None, help="where the PNGs go (default: beside the metrics file)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace PNGs of the same names that shardtune did not write there")
    args = p.parse_args(argv)
    written = plot_file(args.metrics, args.output_dir, args.overwrite)
    for path in written:
        print(path)
    return written
