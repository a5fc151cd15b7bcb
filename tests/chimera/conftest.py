"""Every test of chimera leaves no Worker's temporary folder behind."""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest


@pytest.fixture(autouse=True)
def _no_worker_folder_left() -> Iterator[None]:
    # (The default temporary folder: a test that sets TMPDIR checks its own.)
    temp = Path(tempfile.gettempdir())
    before = set(temp.glob("chimera-worker-*"))
    yield
    left = sorted(set(temp.glob("chimera-worker-*")) - before)
    assert not left, f"the test left Worker folders: {left}"
