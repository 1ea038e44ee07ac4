"""The training loop's seams that a unit test can reach without Ray Train."""

from __future__ import annotations

import ast
import inspect
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
