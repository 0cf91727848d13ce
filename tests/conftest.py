"""Fixtures shared by the test files."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

# Under pytest-xdist each worker gets one thread: two workers with two threads each on a
# 2-core machine oversubscribe the cores and run several times slower than either alone.
if "PYTEST_XDIST_WORKER" in os.environ:
    torch.set_num_threads(1)

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
"""The staged, read-only public datasets beside the checkout (``../shared/data``)."""


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """``../shared/data`` (staged real datasets); the test is skipped when it is absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"staged datasets not found at {SHARED_DATA} (../shared/data beside the "
                    f"checkout)")
    return SHARED_DATA
