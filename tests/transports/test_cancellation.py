"""Cancellation at random points never loses, duplicates or half-sends a message."""

from __future__ import annotations

import itertools
import shutil
import tempfile

import pytest
import trio
import trio.testing
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import transports
from transports import Delivery

from .conftest import BACKENDS

_paths = itertools.count()


async def cancel_after(scope: trio.CancelScope, checkpoints: int) -> None:
    for _ in range(checkpoints):
        await trio.lowlevel.checkpoint()
    scope.cancel()


async def with_random_cancel(checkpoints: int | None, fn, *args):
    """``await fn(*args)``, cancelled after *checkpoints* scheduling points (None: never).

    Returns (cancelled, result).
    """
    async with trio.open_nursery() as nursery:
        with trio.CancelScope() as scope:
            if checkpoints is not None:
                nursery.start_soon(cancel_after, scope, checkpoints)
            result = await fn(*args)
        nursery.cancel_scope.cancel()
    return scope.cancelled_caught, (None if scope.cancelled_caught else result)


async def scenario(address: str, send_plan: list, receive_plans: list[list]) -> None:
    with trio.fail_after(30):
        async with await transports.bind(address) as outlet:
            inlets = [
                await transports.connect(outlet.address, capacity=1),
                await transports.connect(outlet.address, capacity=3),
                await transports.connect(outlet.address, delivery=Delivery.LATEST, capacity=2),
            ]
            received: list[list[int]] = [[], [], []]
            completed: list[int] = []

            async def receive_or_end(inlet: transports.Inlet) -> list[memoryview] | None:
                try:
                    return await inlet.receive()
                except trio.EndOfChannel:
                    return None

            async def consume(index: int) -> None:
                plan = itertools.cycle(receive_plans[index] or [None])
                while True:
                    cancelled, frames = await with_random_cancel(
                        next(plan), receive_or_end, inlets[index]
                    )
                    if cancelled:
                        continue
                    if frames is None:
                        return
                    received[index].append(int(bytes(frames[0])))

            async with trio.open_nursery() as nursery:
                for index in range(3):
                    nursery.start_soon(consume, index)
                for number, checkpoints in enumerate(send_plan):
                    message = [b"%d" % number, bytes(number * 1000)]
                    cancelled, _ = await with_random_cancel(checkpoints, outlet.send, message)
                    if not cancelled:
                        completed.append(number)
                await outlet.aclose()
            for inlet in inlets:
                await inlet.aclose()

    assert received[0] == completed
    assert received[1] == completed
    latest = received[2]
    assert latest == sorted(set(latest)) and set(latest) <= set(completed)
    if completed:
        assert latest[-1] == completed[-1]
    sent_on_links = [link.messages_sent for link in outlet.stats.links]
    assert sent_on_links == [len(completed)] * 3
    latest_stats = inlets[2].stats
    assert latest_stats.messages_received + latest_stats.messages_dropped == len(completed)
    assert outlet.stats.links[2].messages_dropped == latest_stats.messages_dropped


checkpoints = st.one_of(st.none(), st.integers(0, 8))


@pytest.mark.parametrize("backend", list(BACKENDS))
@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    send_plan=st.lists(checkpoints, min_size=1, max_size=25),
    receive_plans=st.lists(st.lists(checkpoints, max_size=6), min_size=3, max_size=3),
)
def test_random_cancellation_keeps_every_link_whole(backend, send_plan, receive_plans):
    folder = tempfile.mkdtemp(prefix="trp", dir="/tmp")
    try:
        address = BACKENDS[backend].format(dir=folder)
        trio.run(scenario, address, send_plan, receive_plans)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _transport_tasks() -> list[str]:
    """The names of the endpoints' I/O tasks running now (Trio system tasks)."""
    root = trio.lowlevel.current_root_task()
    return [
        task.name
        for nursery in root.child_nurseries
        for task in nursery.child_tasks
        if task.name.startswith("transports:")
    ]


async def test_binds_and_connects_cancelled_at_any_point_leave_no_task_behind():
    address = "tcp://127.0.0.1:0"
    # As a service retrying under a timeout: nothing piles up.
    with trio.fail_after(30):
        async with await transports.bind(address) as outlet:
            before = _transport_tasks()
            for step in range(60):
                with trio.move_on_after(step * 20e-6):
                    async with await transports.bind(address):
                        pass
                with trio.move_on_after(step * 20e-6):
                    async with await transports.connect(outlet.address):
                        pass
            await trio.testing.wait_all_tasks_blocked()
            assert _transport_tasks() == before
