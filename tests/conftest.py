"""Shared test fixtures: the real BraTS data in ../shared/data (skipped where absent)."""

from pathlib import Path

import pytest

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The folder of real BraTS scans, or a clean skip where this checkout has none."""
    if not (SHARED_DATA / "brats2018_flair").is_dir():
        pytest.skip(f"real BraTS data not found at {SHARED_DATA} (only present beside the repo)")
    return SHARED_DATA
