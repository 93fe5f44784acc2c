"""TrainState: the run's position as one checkpointable object (what train_state.json stores)."""

from __future__ import annotations

import json
import math

from shardtune.checkpoint.state import TrainState


def test_state_dict_is_train_state_json_position_in_its_key_order():
    state = TrainState(epoch=1, batch=3, step=8, best_val=1.25, saved_at=[4], trained=(2, 7))
    assert list(state.state_dict()) == ["epoch", "batch", "step", "best_val", "saved_at", "trained"]
    saved = json.loads(json.dumps({**state.state_dict(), "data": {"rows": "abc"}}))  # as read back from disk
    again = TrainState.from_state_dict(saved)  # the data record is the checkpointer's, not the state's
    assert again == TrainState(epoch=1, batch=3, step=8, best_val=1.25, saved_at=[4], trained=[2, 7])
    again.saved_at.append(8)  # a list the run appends to
    assert again.saved_at == [4, 8]


def test_advance_moves_to_the_next_epoch_only_when_the_epoch_is_done():
    state = TrainState()
    state.advance(step=3, epoch=0, epoch_batch=6, epoch_batches=10, skip={9, 1})
    assert (state.step, state.epoch, state.batch, state.trained) == (3, 0, 6, (1, 9))
    state.advance(step=5, epoch=0, epoch_batch=10, epoch_batches=10, skip={9, 1})
    assert (state.step, state.epoch, state.batch, state.trained) == (5, 1, 0, ())


def test_record_validation_keeps_the_best_and_a_nan_never_improves():
    state = TrainState()
    assert state.record_validation(2.0) and state.best_val == 2.0
    assert not state.record_validation(2.5) and state.best_val == 2.0
    assert not state.record_validation(math.nan) and state.best_val == 2.0
    assert state.record_validation(1.5) and state.best_val == 1.5
    assert not TrainState().record_validation(math.inf)  # nothing finite to keep
    assert TrainState().best_val is None


def test_resumed_done_names_the_limit_reached():
    assert TrainState(step=4, epoch=1).resumed_done(num_epochs=3, max_train_step=0) is None
    assert "--max_train_step is 4" in TrainState(step=4, epoch=1).resumed_done(num_epochs=3, max_train_step=4)
    assert "all 3 epochs" in TrainState(step=9, epoch=3).resumed_done(num_epochs=3, max_train_step=0)
