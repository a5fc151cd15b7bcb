"""What the cluster benchmarks share: a Manager and Workers in one Trio run,
and the processes under this one.

Imported by ``pipeline.py``, ``recording.py`` and ``scale.py`` (their folder
is first on ``sys.path`` when they run).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import trio

from chimera._manager import AsyncManager
from chimera._worker import AsyncWorker


async def _serve_worker(
    worker: AsyncWorker, manager: AsyncManager, task_status: Any = trio.TASK_STATUS_IGNORED
) -> None:
    async with worker:
        if not await worker.connect(manager.host, manager.port):
            raise RuntimeError(f"worker {worker.name} could not connect")
        task_status.started()
        await trio.sleep_forever()


class Cluster:
    """A Manager (logs in *folder*) and *workers* Workers named ``w0``,
    ``w1``, ... in this Trio run, on the ``tcp`` transport; torn down on exit."""

    def __init__(self, folder: str, workers: int) -> None:
        self.folder, self.count = folder, workers

    async def __aenter__(self) -> AsyncManager:
        self._manager_cm = AsyncManager(Path(self.folder, "logs"), port=0, transport="tcp")
        self.manager = await self._manager_cm.__aenter__()
        self._nursery_cm = trio.open_nursery()
        nursery = await self._nursery_cm.__aenter__()
        for index in range(self.count):
            await nursery.start(_serve_worker, AsyncWorker(f"w{index}"), self.manager)
        await self.manager.wait_for_workers(self.count)
        self._nursery = nursery
        return self.manager

    async def __aexit__(self, *exc: Any) -> None:
        self._nursery.cancel_scope.cancel()
        await self._nursery_cm.__aexit__(None, None, None)
        await self._manager_cm.__aexit__(*exc)


def children(pid: int) -> list[int]:
    """The processes whose parent is *pid* (from /proc)."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as stat:
                    if int(stat.read().rsplit(")", 1)[1].split()[1]) == pid:
                        found.append(int(entry))
            except (OSError, IndexError, ValueError):
                continue
    return found


def read_result(folder: str, name: str) -> dict[str, Any]:
    """What node *name* wrote in its teardown: ``NAME.json`` in *folder*."""
    return json.loads(Path(folder, f"{name}.json").read_text())


def percentile(values: list[float], q: float) -> float:
    """The *q*-th percentile of *values*; NaN if there are none."""
    return float(np.percentile(values, q)) if values else float("nan")
