"""Shared fixtures for the simulator tests: where the public traces are, small setups."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).parents[2]
SHARED_TRACES = REPO.parent / "shared" / "traces"
SAMPLES = REPO / "traces"


@pytest.fixture(scope="session")
def shared_traces() -> Path:
    if not SHARED_TRACES.is_dir():
        pytest.skip(f"public traces not found at {SHARED_TRACES} (the project's shared/ folder)")
    return SHARED_TRACES
