"""The node's thread and the loop its steps run in: order, failure, stopping, and no fd left."""

from __future__ import annotations

import os
import threading

import pytest
import trio
import trio.testing

from chimera._user_thread import StepLoop, UserThread


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


pytestmark = pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs /proc")


async def run_loop(loop: StepLoop, thread: UserThread) -> trio.Event:
    """Start *loop* on *thread*; the event is set once its call returned."""
    ended = trio.Event()
    thread.submit(loop.run, (), lambda outcome: ended.set())
    return ended


async def take_all(loop: StepLoop) -> list:
    taken = []
    while results := await loop.results():
        taken.extend(results)
    return taken


async def test_results_come_back_in_order_then_the_end():
    before = open_fds()
    thread = UserThread("t")
    thread.start()
    loop = StepLoop(lambda x: x * 2)
    ended = await run_loop(loop, thread)
    loop.put([(-1,)])
    with trio.fail_after(10):  # told at once, not when the loop ends
        assert await loop.results() == [(-2, None)]
    loop.put([(i,) for i in range(50)])
    loop.put([(i,) for i in range(50, 100)])
    loop.close()
    with trio.fail_after(10):
        taken = await take_all(loop)
        await ended.wait()
    loop.release()
    thread.close()
    await thread.join()
    assert taken == [(i * 2, None) for i in range(100)]
    assert open_fds() == before


async def test_a_call_to_a_closed_thread_is_refused_not_left_waiting():
    thread = UserThread("t")
    thread.start()
    assert await thread.call(lambda: 1) == 1
    thread.close()
    with trio.fail_after(10), pytest.raises(RuntimeError, match="the node is closed"):
        await thread.call(lambda: 2, abandon=True)  # (abandon: a wait that fails can end)
    await thread.join()


async def test_a_cancelled_call_finishes_first_unless_abandoned():
    thread = UserThread("t")
    thread.start()
    started, go = threading.Event(), threading.Event()

    def block():
        started.set()
        go.wait(10)
        return "done"

    returned: list = []
    ended = trio.Event()

    async def call(scope: trio.CancelScope, abandon: bool) -> None:
        with scope:
            returned.append(await thread.call(block, abandon=abandon))
        ended.set()

    async with trio.open_nursery() as nursery:
        # Abandoned: the cancellation returns at once; the call goes on alone.
        scope = trio.CancelScope()
        nursery.start_soon(call, scope, True)
        await trio.to_thread.run_sync(started.wait, 10)
        scope.cancel()
        with trio.fail_after(10):
            await ended.wait()
        assert returned == []
        go.set()
        # Not abandoned: the cancellation waits for the call, whose value comes back.
        started.clear()
        go.clear()
        ended = trio.Event()
        scope = trio.CancelScope()
        nursery.start_soon(call, scope, False)
        await trio.to_thread.run_sync(started.wait, 10)
        scope.cancel()
        go.set()
        with trio.fail_after(10):
            await ended.wait()
        assert returned == ["done"]
    thread.close()
    await thread.join()


async def test_a_step_that_raises_ends_the_loop():
    thread = UserThread("t")
    thread.start()

    def step(x):
        if x == 3:
            raise ValueError("three")
        return x

    loop = StepLoop(step)
    await run_loop(loop, thread)
    loop.put([(i,) for i in range(10)])  # not closed: the failure alone ends it
    with trio.fail_after(10):
        taken = await take_all(loop)
    loop.release()
    thread.close()
    await thread.join()
    assert [value for value, _ in taken[:3]] == [0, 1, 2]
    assert len(taken) == 4 and isinstance(taken[3][1], ValueError)


async def test_released_while_a_step_runs_the_loop_ends_alone_and_frees_its_socket():
    before = open_fds()
    thread = UserThread("t")
    thread.start()
    started, go = threading.Event(), threading.Event()

    def step():
        started.set()
        go.wait(10)
        return 1

    loop = StepLoop(step)
    ended = await run_loop(loop, thread)
    loop.put([(), (), ()])
    await trio.to_thread.run_sync(started.wait, 10)
    loop.close(discard=True)  # steps not started are not taken
    loop.release()  # the Trio side is gone before the loop tells its last result
    with pytest.raises(trio.ClosedResourceError):
        await loop.results()
    go.set()
    with trio.fail_after(10):
        await ended.wait()
    thread.close()
    await thread.join()
    assert open_fds() == before


async def test_the_loop_says_about_how_long_a_step_takes():
    thread = UserThread("t")
    thread.start()
    loop = StepLoop(lambda seconds: threading.Event().wait(seconds))
    ended = await run_loop(loop, thread)
    assert loop.seconds is None  # no step done yet
    with trio.fail_after(10):
        loop.put([(0.01,)] * 4)  # taken in at once: one batch
        taken = 0
        while taken < 4:
            taken += len(await loop.results())
        first = loop.seconds
        assert first is not None and 0.01 <= first < 0.03  # each step's, not the batch's
        loop.put([(0.0,)] * 10)
        loop.close()
        await take_all(loop)
        await ended.wait()
    # The quicker steps since weigh in, a quarter a batch.
    assert first * 0.75**10 <= loop.seconds < first
    loop.release()
    thread.close()
    await thread.join()


async def test_a_loop_that_pulls_its_steps_stays_ahead_of_what_was_sent_by_at_most_ahead():
    thread = UserThread("t")
    thread.start()
    batches = [[(1,), (2,)], [], [(3,)], [(4,), (5,), (6,)], [(7,)], [(8,)]]
    source = iter(batches)
    #: Steps unsent each time the loop pulled.
    unsent_at_pulls: list[int] = []

    def pull() -> list[tuple] | None:
        unsent_at_pulls.append(loop.unsent)
        return next(source, None)

    loop = StepLoop(lambda x: x * 10, pull=pull, ahead=lambda: 2)
    ended = await run_loop(loop, thread)
    taken = []
    with trio.fail_after(10):
        while results := await loop.results():
            taken.extend(results)
            loop.sent(len(results))
        await ended.wait()
    loop.release()
    thread.close()
    await thread.join()
    assert taken == [(x * 10, None) for x in range(1, 9)]
    assert len(unsent_at_pulls) == len(batches) + 1  # (the last said: no more)
    assert max(unsent_at_pulls) < 2
    assert loop.unsent == 0
    with pytest.raises(ValueError):
        StepLoop(print, pull=pull)


async def test_a_pulled_steps_result_is_told_at_once_when_its_steps_are_slow():
    # (Quick steps' results are told once their pull's steps are done.)
    thread = UserThread("t")
    thread.start()
    go, first_seen = threading.Event(), threading.Event()
    batches = iter([[("slow",)], [("first",), ("second",)]])

    def pull() -> list[tuple] | None:
        batch = next(batches, None)
        if batch and batch[0] == ("first",):
            go.wait(10)  # (until the Trio side waits for results)
        return batch

    def step(what: str) -> str:
        if what == "slow":
            threading.Event().wait(0.002)
        if what == "second":  # (its result would wait for this step)
            assert first_seen.wait(5)
        return what

    loop = StepLoop(step, pull=pull, ahead=lambda: 8)
    ended = await run_loop(loop, thread)
    taken = []
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            some_taken = trio.Event()

            async def take() -> None:
                while results := await loop.results():
                    taken.extend(results)
                    some_taken.set()
                    if ("first", None) in taken:
                        first_seen.set()
                    loop.sent(len(results))

            nursery.start_soon(take)
            await some_taken.wait()
            await trio.testing.wait_all_tasks_blocked()  # (it waits for the next results)
            go.set()
        await ended.wait()
    loop.release()
    thread.close()
    await thread.join()
    assert taken == [("slow", None), ("first", None), ("second", None)]
