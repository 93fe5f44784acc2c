"""shardtune plot: loss, perplexity, throughput and memory PNGs from a run's metrics file."""

import pytest

from shardtune.outputs import ownership
from shardtune.cli import main as cli
from shardtune.config import ShardtuneError
from shardtune.commands.plot import plot_file

PNGS = ("loss.png", "perplexity.png", "throughput.png", "memory.png")


def test_the_run_wrote_every_plot(logged_run):
    for name in PNGS:
        assert (logged_run.output / name).stat().st_size > 5000, name


@pytest.mark.parametrize("source", ["metrics.json", "metrics.jsonl"])
def test_plot_command_writes_the_pngs(logged_run, tmp_path, capsys, source):
    out = tmp_path / "plots"
    cli(["plot", str(logged_run.output / source), "--output_dir", str(out)])
    printed = capsys.readouterr().out
    for name in PNGS:
        assert (out / name).stat().st_size > 5000, name
        assert str(out / name) in printed
    assert set(PNGS) <= ownership.owned(out)  # a folder it created: the plots are listed as its


def test_plot_never_replaces_a_png_it_did_not_write(logged_run, tmp_path):
    (tmp_path / "loss.png").write_bytes(b"mine")
    with pytest.raises(ShardtuneError, match="did not write"):
        plot_file(logged_run.output / "metrics.json", tmp_path)
    assert (tmp_path / "loss.png").read_bytes() == b"mine"
    plot_file(logged_run.output / "metrics.json", tmp_path, overwrite=True)
    assert (tmp_path / "loss.png").stat().st_size > 5000


def test_plot_explains_a_file_without_steps(tmp_path):
    (tmp_path / "metrics.json").write_text("{}")
    with pytest.raises(ShardtuneError, match="no training steps"):
        plot_file(tmp_path / "metrics.json")
