"""The training loop's seams that a unit test can reach without Ray Train."""

from __future__ import annotations

import ast
import inspect
import json
import math
from pathlib import Path

import pytest

from raylab.train import loop
from raylab.tune.asha import RungWait


def gate_calls(source: str) -> list[ast.Call]:
    """Every `gate.<method>(...)` call in a module's source."""
    return [node for node in ast.walk(ast.parse(source))
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
            and isinstance(node.func.value, ast.Name) and node.func.value.id == "gate"]


def binds(call: ast.Call) -> None:
    """Bind the call's positional and keyword arguments to RungWait's method (TypeError if they do not fit)."""
    method = getattr(RungWait, call.func.attr)
    inspect.signature(method).bind(object(), *call.args, **{k.arg: k.value for k in call.keywords})


def test_the_loop_calls_the_gate_as_rung_wait_accepts():
    calls = gate_calls(Path(loop.__file__).read_text())
    assert {c.func.attr for c in calls} == {"start", "after_eval"}
    for call in calls:
        binds(call)


def test_a_call_rung_wait_does_not_accept_is_caught():  # negative control: the old `log=` keyword
    (call,) = gate_calls("gate.after_eval(step, log=print)")
    with pytest.raises(TypeError):
        binds(call)


# ---------------------------------------------------------------- TrainState (state.json)

# state.json as the loop wrote it before TrainState: a checkpoint of a run never resumed
OLD_STATE = {"step": 6, "epoch": 1, "batches_in_epoch": 2, "tokens": 900, "world_size": 2, "best_val_loss": 2.5,
             "evals_without_improvement": 1, "stopped_early": False, "last_checkpoint_step": 6,
             "history": [{"step": 0, "val_loss": 3.0}, {"step": 6, "val_loss": 2.6}],
             "val": {"val_loss": 2.6, "val_perplexity": 13.5, "val_token_accuracy": 0.3},
             "flops": {"flops_per_token": 1e6}}


def test_an_old_state_json_resumes_with_every_key_and_value():
    state = loop.TrainState.from_dict(json.loads(json.dumps(OLD_STATE)))
    written = state.to_dict()
    assert {k: written[k] for k in OLD_STATE} == OLD_STATE
    assert written["resumed_at_steps"] == [] and written["replica_digests"] == [] and written["worker_nodes"] == []
    assert loop.TrainState.from_dict(written) == state
    # what the driver reads from the last checkpoint's state.json
    resumed = loop.TrainState.from_dict(OLD_STATE | {"resumed_at_steps": [4], "replica_digests": ["ab", "ab"]})
    assert resumed.resumed_at_steps == [4] and resumed.replica_digests == ["ab", "ab"]


def test_state_json_keeps_nan_and_the_early_stopping_rule():
    state = loop.TrainState(best_val_loss=float("nan"))
    back = loop.TrainState.from_dict(json.loads(json.dumps(state.to_dict(), allow_nan=True)))
    assert math.isnan(back.best_val_loss)
    state = loop.TrainState()
    for v, patience_left in [(3.0, True), (2.0, True), (2.5, True), (2.4, False)]:
        state.evaluated({"val_loss": v})
        assert state.out_of_patience(2) is not patience_left
    assert state.best_val_loss == 2.0 and state.evals_without_improvement == 2
    assert not state.out_of_patience(None)  # no patience configured: never stops early


def test_a_window_is_the_token_mean_loss_of_its_steps():
    window = loop.Window()
    window.add({"loss": 2.0, "targets": 10, "real_tokens": 12, "grad_norm": 0.5}, 1.0)
    window.add({"loss": 1.0, "targets": 30, "real_tokens": 31, "grad_norm": 0.25}, 0.5)
    assert window.stats() == {"loss": 50 / 40, "grad_norm": 0.25, "real_tokens": 43, "seconds": 1.5, "steps": 2}
    assert loop.Window().stats()["loss"] == 0.0  # an empty window divides by one, not zero
