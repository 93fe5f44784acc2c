import json

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
