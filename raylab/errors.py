"""Errors a user can fix. The CLI turns them into one message and exit code 2; a run that
failed for a reason outside raylab (`RunFailed`) is exit 1 with its message; anything else is
a bug and keeps its traceback (exit 1)."""

from __future__ import annotations


class UserError(Exception):
    """A problem the user can fix: bad config, bad argument, a plan that does not fit.

    The message names what to fix (the key, flag or record), what was received and what is
    expected.
    """


class ConfigError(UserError):
    """Every problem found in one config, reported together."""

    def __init__(self, source: str, problems: list[str]):
        self.source = source
        self.problems = problems
        noun = "problem" if len(problems) == 1 else "problems"
        lines = [f"{source}: {len(problems)} {noun}"] + [f"  {p}" for p in problems]
        super().__init__("\n".join(lines))


class RunFailed(Exception):
    """A run that could not finish for a reason outside the config and outside raylab's code:
    workers or nodes died more often than `train.max_failures` allows. Exit 1 with the
    message (which carries the worker's error), no traceback, and not reported as a bug."""
