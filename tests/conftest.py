"""Fixtures shared by the test files."""

from __future__ import annotations

from pathlib import Path

import pytest

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
"""The staged, read-only public datasets beside the checkout (``../shared/data``)."""


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """``../shared/data`` (staged real datasets); the test is skipped when it is absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"staged datasets not found at {SHARED_DATA} (../shared/data beside the "
                    f"checkout)")
    return SHARED_DATA
