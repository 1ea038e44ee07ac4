"""Fixtures of the explain tests."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny matrices: several torch threads on a shared 2-core machine only contend (a 200-step
    training took minutes instead of seconds); the setting is restored for the next module."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
