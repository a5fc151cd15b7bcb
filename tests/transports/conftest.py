"""Fixtures of the transports suite: one address per backend, and raw peers."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator

import pytest

#: Backend (as the test ids show it) -> a bind address template.
BACKENDS = {
    "memory": "memory://",
    "tcp": "tcp://127.0.0.1:0",
    "unix": "unix://{dir}/outlet.sock",
    "nng": "nng+tcp://127.0.0.1:0",
}
NETWORKED = [name for name in BACKENDS if name != "memory"]


@pytest.fixture
def short_dir() -> Iterator[str]:
    """A short temporary folder (Unix socket paths are limited to ~100 bytes)."""
    path = tempfile.mkdtemp(prefix="trp", dir="/tmp")
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(params=list(BACKENDS))
def backend(request) -> str:
    return request.param


@pytest.fixture
def address(backend: str, short_dir: str) -> str:
    """A bind address for the backend under test."""
    return BACKENDS[backend].format(dir=short_dir)


@pytest.fixture(params=NETWORKED)
def net_address(request, short_dir: str) -> str:
    """A bind address for each backend that crosses a real socket."""
    return BACKENDS[request.param].format(dir=short_dir)
