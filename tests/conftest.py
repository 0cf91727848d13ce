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


@pytest.fixture(scope="session")
def mnist16(shared_data):
    """Real MNIST (``../shared/data/mnist``) resized to 16x16, for small standard-training tests:
    ``(train store, test store, root)``, loaded once per session; skipped without the idx files."""
    from metarobust.config import DataConfig
    from metarobust.data.datasets import load_split

    root = shared_data / "mnist"
    if not (root / "train-images-idx3-ubyte.gz").is_file():
        pytest.skip(f"MNIST idx files not found in {root}")
    cfg = DataConfig(dataset="mnist", root=str(root), image_size=16)
    return load_split(cfg, "train"), load_split(cfg, "test"), str(root)
