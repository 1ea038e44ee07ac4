"""Progress goes through `logging` (raylab/core/logs.py), not a `log=print` parameter threaded
through functions."""

import ast
import logging
from pathlib import Path

from raylab.core import logs

PACKAGE = Path(logs.__file__).resolve().parents[1]


def log_parameters(source: str) -> list[str]:
    """Functions that take a progress callback: a parameter named `log`, or one defaulting to print."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            continue
        a = node.args
        params = [*a.posonlyargs, *a.args, *a.kwonlyargs]
        defaults = [*a.defaults, *a.kw_defaults]
        name = getattr(node, "name", "<lambda>")
        if any(p.arg == "log" for p in params):
            found.append(f"line {node.lineno}: {name}(log)")
        elif any(isinstance(d, ast.Name) and d.id == "print" for d in defaults if d is not None):
            found.append(f"line {node.lineno}: {name}(...=print)")
    return found


def test_the_scan_catches_a_log_parameter():  # negative control: the scan has teeth
    bad = "def a(cfg, log=print): pass\ndef b(x, *, log): pass\ndef c(x, say=print): pass\n"
    assert len(log_parameters(bad)) == 3
    assert log_parameters("def a(cfg, logger=None): pass\nlog = logging.getLogger(__name__)\n") == []


def test_no_function_takes_a_log_callback():
    problems = {str(p.relative_to(PACKAGE)): found for p in sorted(PACKAGE.rglob("*.py"))
                if (found := log_parameters(p.read_text()))}
    assert problems == {}, f"report progress with logging.getLogger(__name__), not a log parameter: {problems}"


def test_console_prints_raylab_progress_to_stdout(capsys):
    logs.console()
    logging.getLogger("raylab.data.stage").info("data: 3 records")
    logging.getLogger("raylab.data.stage").debug("not shown at INFO")
    out = capsys.readouterr().out
    assert "data: 3 records" in out and "not shown" not in out
