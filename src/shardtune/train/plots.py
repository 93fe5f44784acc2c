"""PNG plots of a run's metrics: loss, perplexity, throughput (tokens/s, MFU) and memory.

Written by ``--save_metrics`` at every save point (``metrics.py``) and by ``shardtune plot``
(``commands/plot.py``). Drawn with matplotlib's object API on the Agg canvas (no display, and the
global pyplot backend of a notebook that imports shardtune is left alone).
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence


PLOTS = ("loss.png", "perplexity.png", "throughput.png", "memory.png")
_MEMORY = (("train_step_gpu_max_allocated_gib", "GPU max allocated"),
           ("train_step_gpu_max_reserved_gib", "GPU max reserved"),
           ("train_step_host_rss_gib", "host RSS (rank 0)"))


def _points(xs: Sequence, ys: Optional[Sequence]) -> tuple[list, list]:
    pairs = [(x, y) for x, y in zip(xs, ys or []) if x is not None and y is not None]
    return [p[0] for p in pairs], [p[1] for p in pairs]


def plots_for(data: dict) -> list[str]:
    """The PNG names ``plot_metrics`` writes for ``data``."""
    names = []
    if data.get("train_step_loss"):
        names += ["loss.png", "perplexity.png"]
    if data.get("train_step_tokens_per_s"):
        names.append("throughput.png")
    if any(data.get(key) for key, _ in _MEMORY):
        names.append("memory.png")
    return names


def _figure(rows: int = 1):
    from matplotlib.figure import Figure

    height = 3.2 * rows + 0.8
    fig = Figure(figsize=(6.4, height))
    # fixed margins: tight_layout would measure every label again, most of a plot's cost
    fig.subplots_adjust(left=0.13, right=0.87, bottom=0.5 / height, top=1 - 0.35 / height, hspace=0.3)
    return fig, fig.subplots(rows, 1, squeeze=False)[:, 0]


def _save(fig, path: Path) -> Path:
    fig.savefig(path, dpi=100)
    return path


def plot_metrics(data: dict, out: str | Path) -> list[Path]:
    """Write the plots of metrics.json's ``data`` into ``out``; returns the files written."""
    out = Path(out)
    steps = data.get("train_step") or []
    written = []
    names = plots_for(data)
    for name in ("loss", "perplexity"):
        if f"{name}.png" not in names:
            continue
        fig, (ax,) = _figure()
        ax.plot(*_points(steps, data.get(f"train_step_{name}")), label=f"train {name}")
        val_x, val_y = _points(data.get("val_step") or [], data.get(f"val_epoch_{name}"))
        if val_y:
            ax.plot(val_x, val_y, "o-", label=f"validation {name}")
        ax.set_xlabel("optimizer step")
        ax.set_ylabel(name)
        if name == "perplexity":
            ax.set_yscale("log")
        ax.legend()
        ax.grid(alpha=0.3)
        written.append(_save(fig, out / f"{name}.png"))
    if "throughput.png" in names:
        mfu_x, mfu_y = _points(steps, data.get("train_step_mfu"))
        fig, axes = _figure(2 if mfu_y else 1)
        axes[0].plot(*_points(steps, data.get("train_step_tokens_per_s")))
        axes[0].set_ylabel("tokens/s (all ranks)")
        if mfu_y:
            axes[1].plot(mfu_x, [100 * v for v in mfu_y], color="tab:green")
            axes[1].set_ylabel("MFU %")
            peak = data.get("peak_tflops")
            if peak:  # the same curve read as TFLOP/s per device
                right = axes[1].secondary_yaxis("right", functions=(lambda p: p * peak / 100, lambda t: t * 100 / peak))
                right.set_ylabel("TFLOP/s per device")
                axes[0].set_title(f"peak {peak:,.3g} TFLOP/s per device ({data.get('peak_source', '?')})",
                                  fontsize=7)
        for ax in axes:
            ax.grid(alpha=0.3)
        axes[-1].set_xlabel("optimizer step")
        written.append(_save(fig, out / "throughput.png"))
    if "memory.png" in names:
        fig, (ax,) = _figure()
        for key, label in _MEMORY:
            x, y = _points(steps, data.get(key))
            if y:
                ax.plot(x, y, label=label)
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("GiB (at or during each step)")
        ax.set_ylim(bottom=0)
        ax.legend()
        ax.grid(alpha=0.3)
        written.append(_save(fig, out / "memory.png"))
    return written
