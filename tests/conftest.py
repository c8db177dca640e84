"""Shared fixtures.

The paper's released datasets live next to the repository (``../shared/datasets``)
rather than in it: they are large and not ours to redistribute, so a fresh
clone does not have them and the tests that need them skip.
"""

from __future__ import annotations

from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def shared_datasets() -> Path:
    """``../shared/datasets`` relative to the repository root (``years/``, ``random_bd/``)."""
    path = (REPO_ROOT.parent / "shared" / "datasets").resolve()
    if not path.is_dir():
        pytest.skip("../shared/datasets not present (fresh clone); CI has it")
    return path
