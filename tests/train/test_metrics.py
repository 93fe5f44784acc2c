import json

import pytest
import torch

from shardtune.outputs import ownership
from shardtune.train.loop import LoopResult, StepResult
from shardtune.train.metrics import MetricsLog


def test_metrics_file_and_plots(tmp_path):
    m = MetricsLog()
    for step, loss in enumerate([3.0, 2.5, 2.0], start=1):
        m.after_step(StepResult(step=step, epoch=0, loss=loss, label_tokens=10, input_tokens=100,
                                seconds=0.5, lr=1e-3))
    m.add_epoch(LoopResult(loss=2.5, steps=3, label_tokens=30, input_tokens=300, seconds=1.5))
    m.add_validation(3, LoopResult(loss=2.2, steps=1, label_tokens=5, input_tokens=50, seconds=0.1))
    path = m.write(tmp_path)
    data = json.loads(path.read_text())
    assert data["train_step_loss"] == [3.0, 2.5, 2.0]
    assert data["train_step_tokens_per_s"] == [200.0, 200.0, 200.0]
    assert data["train_epoch_loss"] == [2.5] and data["val_epoch_loss"] == [2.2]
    assert abs(data["val_epoch_perplexity"][0] - 9.025) < 1e-2
    assert data["val_step"] == [3] and data["epoch_time_s"] == [1.5]
    for png in ("loss.png", "perplexity.png"):
        assert (tmp_path / png).stat().st_size > 1000


def test_a_resumed_log_keeps_history_up_to_the_checkpoint(tmp_path):
    import json

    from shardtune.train.metrics import MetricsLog

    saved = {"train_step": [1, 2, 3, 4], "train_step_loss": [4.0, 3.0, 2.0, 1.0],
             "train_epoch_loss": [3.5, 1.5], "val_step": [2, 4], "val_epoch_loss": [3.4, 1.4]}
    (tmp_path / "metrics.json").write_text(json.dumps(saved))
    log = MetricsLog.continued(tmp_path, step=3, epochs_done=1)
    assert log.train_step == [1, 2, 3] and log.train_step_loss == [4.0, 3.0, 2.0]
    assert log.train_epoch_loss == [3.5] and log.val_step == [2] and log.val_epoch_loss == [3.4]
    assert MetricsLog.continued(tmp_path / "none", step=3, epochs_done=1).train_step == []


def _step(step, loss=2.0):
    return StepResult(step=step, epoch=0, loss=loss, label_tokens=10, input_tokens=100, seconds=0.5, lr=1e-3)


def test_metrics_jsonl_is_appended_per_save_point_and_json_rewritten(tmp_path):
    from shardtune.train.metrics import read_records

    m = MetricsLog()
    m.info = {"peak_tflops": 1.0}
    m.after_step(_step(1))
    m.write(tmp_path)
    first = (tmp_path / "metrics.jsonl").read_bytes()
    assert [r["kind"] for r in read_records(tmp_path / "metrics.jsonl")] == ["run", "step"]
    m.after_step(_step(2, 1.5))
    m.add_epoch(LoopResult(loss=1.7, steps=2, label_tokens=20, input_tokens=200, seconds=1.0), step=2)
    m.write(tmp_path)
    second = (tmp_path / "metrics.jsonl").read_bytes()
    assert second.startswith(first)  # appended, the earlier lines untouched
    assert [r["kind"] for r in read_records(tmp_path / "metrics.jsonl")] == ["run", "step", "step", "epoch"]
    data = json.loads((tmp_path / "metrics.json").read_text())  # the whole picture, llama-recipes' shape
    assert data["train_step_loss"] == [2.0, 1.5] and data["train_epoch_step"] == [2] and data["peak_tflops"] == 1.0
    with open(tmp_path / "metrics.jsonl", "a") as f:  # a crash mid-append leaves a torn line
        f.write('{"kind": "step", "train_st')
    assert len(read_records(tmp_path / "metrics.jsonl")) == 4
    fresh = MetricsLog()  # a new run into the same folder starts the file again
    fresh.after_step(_step(1, 9.0))
    fresh.write(tmp_path)
    assert [r.get("train_step_loss") for r in read_records(tmp_path / "metrics.jsonl")] == [None, 9.0]


def test_a_resumed_log_continues_from_metrics_jsonl_cut_at_the_checkpoint(tmp_path):
    from shardtune.train.metrics import read_records

    m = MetricsLog()
    for step in range(1, 5):
        m.after_step(_step(step, 5.0 - step))
    m.add_validation(4, LoopResult(loss=1.4, steps=1, label_tokens=5, input_tokens=50, seconds=0.1))
    m.write(tmp_path)
    log = MetricsLog.continued(tmp_path, step=2, epochs_done=0)
    assert log.train_step == [1, 2] and log.val_step == []
    log.after_step(_step(3, 0.5))
    log.write(tmp_path)  # the resumed run's first write: the history up to the checkpoint, then its own
    assert [r["train_step_loss"] for r in read_records(tmp_path / "metrics.jsonl") if r["kind"] == "step"] == [
        4.0, 3.0, 0.5]


def test_metrics_per_step_carry_throughput_mfu_and_memory(logged_run):
    """A tiny CPU run: every step's tokens/s, model TFLOP/s per device, MFU and host RSS."""
    data = logged_run.metrics
    n = len(data["train_step"])
    assert n == 10 and data["train_step"] == list(range(1, 11))
    for key in ("train_step_tokens_per_s", "train_step_tflops", "train_step_mfu", "train_step_host_rss_gib"):
        assert len(data[key]) == n and all(v > 0 for v in data[key]), key
    for tflops, mfu in zip(data["train_step_tflops"], data["train_step_mfu"]):
        assert mfu == pytest.approx(tflops / data["peak_tflops"])
    assert all(0.1 < rss < 64 for rss in data["train_step_host_rss_gib"])  # GiB, read from the OS
    assert "train_step_gpu_max_allocated_gib" not in data  # a CPU run has no GPU figures
    assert len(data["train_epoch_mfu"]) == 2 and data["train_epoch_step"] == [5, 10]
    assert data["train_epoch_host_rss_max_gib"][0] >= min(data["train_step_host_rss_gib"][:5])
    assert data["world_size"] == 1 and data["model_matmul_params"] == data["weight_grad_params"]
    lines = (logged_run.output / "metrics.jsonl").read_text().splitlines()
    steps = [json.loads(ln) for ln in lines if '"kind": "step"' in ln]
    assert [s["train_step_mfu"] for s in steps] == data["train_step_mfu"]
    assert {"metrics.json", "metrics.jsonl", "throughput.png", "memory.png"} <= ownership.owned(logged_run.output)


def test_the_progress_lines_show_throughput_mfu_and_memory(tiny_model_dir, capsys):
    """Without a terminal (pytest captures stderr), plain lines with the bar's figures, no frames."""
    from transformers import AutoModelForCausalLM

    from shardtune.parallel.distributed import DistEnv
    from shardtune.train.loop import train_epoch
    from shardtune.train.perf import StepMeter

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    ids = torch.randint(4, model.config.vocab_size, (2, 16))
    batches = [{"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}] * 2
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    meter = StepMeter.for_model(model, DistEnv(), torch.float32, peak_tflops=0.5)
    result = train_epoch(model, batches, opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0),
                         env=DistEnv(), epoch=0, start_step=0, meter=meter)
    out, err = capsys.readouterr()  # (err: transformers' weight-loading bar, before the quieting a run does)
    assert "\r" not in out and "Training" not in err
    lines = [ln for ln in out.splitlines() if ln.startswith("Training: step ")]
    assert [ln.split()[2] for ln in lines] == ["1", "2"], out  # no total known: the first and the last
    for field in ("loss=", "tok_s=", "tflops=", "mfu=", "mem=", "lr="):
        assert field in lines[-1], lines
    assert result.perf.mfu == pytest.approx(result.perf.tflops / 0.5)
    assert result.perf.host_rss_max_gib > 0 and result.perf.gpu_max_allocated_gib is None


@pytest.mark.gpu
def test_gpu_steps_report_the_table_peak_and_gpu_memory(tiny_model_dir):
    """On a GPU: the data-sheet peak of a known GPU in bf16, and the step's CUDA memory peaks."""
    from transformers import AutoModelForCausalLM

    from shardtune.parallel.distributed import DistEnv
    from shardtune.train.loop import Precision, train_epoch
    from shardtune.train.peak import lookup_gpu
    from shardtune.train.perf import StepMeter

    env = DistEnv(device=torch.device("cuda", 0))
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).cuda()
    ids = torch.randint(4, model.config.vocab_size, (4, 64))
    batches = [{"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}] * 3
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    meter = StepMeter.for_model(model, env, torch.bfloat16)
    known = lookup_gpu(torch.cuda.get_device_name(0))
    assert meter.peak.measured is (known is None)
    if known is not None:
        assert meter.peak.flops == pytest.approx(known.bf16 * 1e12) and "dense bf16" in meter.peak.source
    seen = []

    class Keep:
        def before_step(self, step):
            pass

        def after_step(self, r):
            seen.append(r.perf)

    result = train_epoch(model, batches, opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0), env=env,
                         epoch=0, start_step=0, meter=meter, hooks=[Keep()],
                         precision=Precision(device_type="cuda", autocast_dtype=torch.bfloat16))
    assert len(seen) == 3 and all(p.gpu_max_allocated_gib > 0 for p in seen)
    assert all(p.gpu_max_reserved_gib >= p.gpu_max_allocated_gib for p in seen)
    assert all(0 < p.mfu < 1 for p in seen)  # a tiny model is far from any GPU's peak
    assert result.perf.gpu_max_allocated_gib == pytest.approx(max(p.gpu_max_allocated_gib for p in seen))

