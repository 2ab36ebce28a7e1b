"""Shared pytest fixtures."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]


def find_shared() -> Path | None:
    """The shared data folder: $PCACE_SHARED, else ../shared beside the repository."""
    env = os.environ.get("PCACE_SHARED")
    candidates = [Path(env).expanduser()] if env else []
    candidates.append(REPO_ROOT.parent / "shared")
    for path in candidates:
        if (path / "data").is_dir():
            return path.resolve()
    return None


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    """Root of the read-only shared material (holds data/ and fixtures/); skips if absent."""
    path = find_shared()
    if path is None:
        pytest.skip("shared data not found: set PCACE_SHARED or put it at ../shared")
    return path
