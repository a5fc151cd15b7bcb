"""Waiting on what chimera logs: the moment a line is logged, as an event."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager


class _OnRecord(logging.Handler):
    def __init__(self, text: str, action: Callable[[], None]) -> None:
        super().__init__()
        self.text, self.action = text, action

    def emit(self, record: logging.LogRecord) -> None:
        if self.text in record.getMessage():
            self.action()


@contextmanager
def on_record(logger: str, text: str, action: Callable[[], None]) -> Iterator[None]:
    """Within the block, call *action* (in the thread that logs) on each record
    of *logger* (or below it) whose message contains *text* (records below
    the logger's level are not made: set it low enough)."""
    handler = _OnRecord(text, action)
    logging.getLogger(logger).addHandler(handler)
    try:
        yield
    finally:
        logging.getLogger(logger).removeHandler(handler)
