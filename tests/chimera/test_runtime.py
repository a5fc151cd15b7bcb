"""One node's runtime, inline on the memory transport: stepping, following, stopping, failing."""

from __future__ import annotations

import logging
import pickle
import re
import threading
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass

import numpy as np
import pytest
import trio
import trio.testing
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import chimera as cp
import chimera._runtime
import transports
from chimera._data import decode_chunk
from chimera._runtime import Input, NodeRuntime


class Count(cp.Node):
    """Sends 1..n (each as :meth:`made` makes it), then nothing (a source is
    stopped from outside); sets *sent_all* (a threading.Event) once it made n."""

    def __init__(self, name, n, gate=None, sent_all=None):
        super().__init__(name)
        self.n, self.sent, self.gate, self.sent_all = n, 0, gate, sent_all

    def step(self):
        if self.gate is not None:
            self.gate.wait(10)
        if self.sent == self.n:
            threading.Event().wait(0.001)  # a source steps in a loop: idle a little
            return None
        self.sent += 1
        if self.sent == self.n and self.sent_all is not None:
            self.sent_all.set()
        return self.made(self.sent)

    def made(self, number):
        """What the step that counts *number* returns."""
        return number


class Double(cp.Node):
    def step(self, data_chunks):
        return data_chunks["count"].get("default")["value"] * 2


class Collect(cp.Node):
    """Keeps what it receives; sets *done* (a threading.Event) after *n* chunks."""

    def __init__(self, name, n, done):
        super().__init__(name)
        self.n, self.done, self.seen, self.torn_down = n, done, [], 0

    def step(self, data_chunks):
        self.seen.append(
            {name: chunk.get("default")["value"] for name, chunk in sorted(data_chunks.items())}
        )
        if len(self.seen) == self.n:
            self.done.set()

    def teardown(self):
        self.torn_down += 1


async def run_pipeline(
    nodes, edges, follow=None, until=None, stop=(), transport="memory", latest=()
):
    """Run *nodes* wired by *edges* [(src, dst)] inline (LATEST for those in
    *latest*); stop the *stop* sources once *until* (a threading.Event) is set;
    return every runtime once all ended."""
    follow = follow or {}
    states: dict[str, list[cp.NodeState]] = {node.name: [] for node in nodes}
    async with AsyncExitStack() as stack:
        runtimes = {}
        for node in nodes:
            runtimes[node.name] = await stack.enter_async_context(
                NodeRuntime(
                    node,
                    inputs=[
                        Input(src.name, "latest" if (src, dst) in latest else "reliable")
                        for src, dst in edges
                        if dst is node
                    ],
                    follow=follow.get(node.name),
                    outputs=sum(src is node for src, _ in edges),
                    transport=transport,
                    on_state=lambda state, reason, name=node.name: states[name].append(state),
                )
            )
        for node in nodes:
            await runtimes[node.name].connect(
                {src.name: runtimes[src.name].address for src, dst in edges if dst is node}
            )
        for runtime in runtimes.values():
            await runtime.prep()
        async with trio.open_nursery() as nursery:
            for runtime in runtimes.values():
                nursery.start_soon(runtime.run)
            if until is not None:
                await trio.to_thread.run_sync(until.wait, 10)
                for name in stop:
                    runtimes[name].request_stop()
    return runtimes, states


@pytest.mark.parametrize("transport", ["memory", "tcp"])
async def test_a_chain_steps_every_chunk_once_in_order_and_ends_cleanly(transport):
    done = threading.Event()
    count, double, collect = Count("count", 50), Double("double"), Collect("collect", 50, done)
    with trio.fail_after(20):
        runtimes, states = await run_pipeline(
            [count, double, collect],
            [(count, double), (double, collect)],
            until=done,
            stop=["count"],
            transport=transport,
        )
    assert collect.seen == [{"double": 2 * i} for i in range(1, 51)]
    assert collect.torn_down == 1
    assert states["collect"] == [
        cp.NodeState.INITIALIZED,
        cp.NodeState.CONNECTED,
        cp.NodeState.READY,
        cp.NodeState.RUNNING,
        cp.NodeState.STOPPED,
        cp.NodeState.SHUTDOWN,
    ]
    assert runtimes["double"].steps == 50


@pytest.mark.parametrize("transport", ["memory", "tcp"])
async def test_chunks_that_come_alone_and_in_bursts_are_stepped_once_each_in_order(transport):
    # A def step's chunk that comes alone leaves from the node's thread (on
    # tcp); those of a burst, from the event loop, together: the nodes
    # downstream see one sequence either way.
    class Uneven(Count):
        def step(self):
            if self.sent % 5 == 0 or self.sent == self.n - 1:
                threading.Event().wait(0.0005)  # then a burst of five (the last: alone)
            return super().step()

    done, done_too = threading.Event(), threading.Event()
    uneven, double = Uneven("count", 300), Double("double")
    first, second = Collect("first", 300, done), Collect("second", 300, done_too)
    both = threading.Event()
    threading.Thread(target=lambda: (done.wait(20), done_too.wait(20), both.set())).start()
    with trio.fail_after(30):
        runtimes, states = await run_pipeline(
            [uneven, double, first, second],
            [(uneven, double), (uneven, first), (double, second)],
            until=both,
            stop=["count"],
            transport=transport,
        )
    assert first.seen == [{"count": i} for i in range(1, 301)]
    assert second.seen == [{"double": 2 * i} for i in range(1, 301)]
    assert runtimes["double"].steps == 300
    assert all(cp.NodeState.FAILED not in history for history in states.values())
    last = await runtimes["count"].gather()  # (what Manager.gather shows)
    assert last is not None and decode_chunk(last).get("default")["value"] == 300


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    pauses=st.lists(st.sampled_from([0.0, 0.0, 0.0003, 0.001]), min_size=1, max_size=60),
    fan_out=st.integers(1, 3),
)
def test_any_pace_keeps_every_chunk_once_in_order_over_tcp(pauses, fan_out):
    # Whichever chunks leave from the source's thread and whichever from its
    # event loop, each sink steps on all of them, once, in order.
    n = len(pauses)

    class Paced(Count):
        def step(self):
            if self.sent < self.n and pauses[self.sent]:
                threading.Event().wait(pauses[self.sent])
            return super().step()

    async def main():
        events = [threading.Event() for _ in range(fan_out)]
        source = Paced("count", n)
        sinks = [Collect(f"sink{i}", n, events[i]) for i in range(fan_out)]
        every = threading.Event()

        def all_done():
            for event in events:
                event.wait(20)
            every.set()

        threading.Thread(target=all_done, daemon=True).start()
        with trio.fail_after(30):
            await run_pipeline(
                [source, *sinks],
                [(source, sink) for sink in sinks],
                until=every,
                stop=["count"],
                transport="tcp",
            )
        return [sink.seen for sink in sinks]

    seen = trio.run(main)
    assert seen == [[{"count": i} for i in range(1, n + 1)]] * fan_out


@pytest.mark.parametrize("transport", ["memory", "tcp"])
async def test_a_slow_node_on_a_latest_input_steps_on_ever_newer_chunks_and_counts_the_rest(
    transport,
):
    sent_all = threading.Event()

    class Fast(cp.Node):
        def prep(self):
            self.sent = 0

        def step(self):
            if self.sent == 300:
                sent_all.set()
                threading.Event().wait(0.001)
                return None
            self.sent += 1
            return self.sent

    class Slow(Collect):
        def step(self, data_chunks):
            threading.Event().wait(0.005)
            super().step(data_chunks)

    fast, slow = Fast("fast"), Slow("slow", 0, threading.Event())
    with trio.fail_after(20):
        runtimes, _ = await run_pipeline(
            [fast, slow],
            [(fast, slow)],
            until=sent_all,
            stop=["fast"],
            transport=transport,
            latest=[(fast, slow)],
        )
    seen = [chunks["fast"] for chunks in slow.seen]
    assert seen == sorted(set(seen)) and seen[-1] == 300  # newer each time; the newest came
    assert len(seen) < 300
    stats = runtimes["slow"].stats()
    assert (stats["steps"], stats["dropped"]) == (len(seen), 300 - len(seen))


@pytest.mark.parametrize("transport", ["memory", "tcp"])
async def test_a_node_on_a_latest_input_steps_next_on_the_newest_chunk(transport):
    # Not on the chunks that came while it stepped (it would lag behind for good).
    sent_all = threading.Event()

    class Waits(Collect):
        def step(self, data_chunks):
            if not self.seen:
                sent_all.wait(10)  # while it steps on its first chunk, all the others come
            super().step(data_chunks)

    count, waits = Count("count", 300, sent_all=sent_all), Waits("waits", 0, threading.Event())
    with trio.fail_after(20):
        await run_pipeline(
            [count, waits],
            [(count, waits)],
            until=sent_all,
            stop=["count"],
            transport=transport,
            latest=[(count, waits)],
        )
    seen = [chunks["count"] for chunks in waits.seen]
    assert seen == sorted(set(seen)) and seen[-1] == 300
    assert len(seen) <= 3, seen  # the first, then the newest (maybe one on its way)


class Paced(cp.Node):
    """Sends 1, 2, ... one every *seconds*; keeps how far ahead of *behind*
    (a :class:`Slow`'s steps) it is at each step."""

    def __init__(self, name, seconds, behind=None):
        super().__init__(name)
        self.seconds, self.behind, self.ahead = seconds, behind, []

    def prep(self):
        self.made = 0

    def step(self):
        threading.Event().wait(self.seconds)
        self.made += 1
        if self.behind is not None:
            self.ahead.append(self.made - self.behind.stepped)
        return self.made


class Slow(cp.Node):
    """Takes *seconds* a step (its first, *first* if given); sets *done* after *n* steps."""

    def __init__(self, name, seconds, n, done, first=None):
        super().__init__(name)
        self.seconds, self.n, self.done, self.stepped = seconds, n, done, 0
        self.first = seconds if first is None else first

    def step(self, data_chunks):
        threading.Event().wait(self.first if self.stepped == 0 else self.seconds)
        self.stepped += 1
        if self.stepped == self.n:
            self.done.set()


@pytest.mark.parametrize("first", [None, 0.3])
@pytest.mark.parametrize("transport", ["memory", "tcp"])
async def test_a_source_behind_a_slow_node_keeps_only_a_few_chunks_ahead_of_it(transport, first):
    # On a reliable edge a slow node slows its source down to its pace. The
    # chunks between them (on the source's thread, in the link, on the slow
    # node's thread) stay few: steps that take long are not queued by dozens
    # (a source 20x as fast ran hundreds of chunks ahead), nor while the
    # first step, maybe the slowest, is not done.
    done = threading.Event()
    slow = Slow("slow", 0.02, 30, done, first=first)
    source = Paced("source", 0.001, behind=slow)
    with trio.fail_after(20):
        await run_pipeline([source, slow], [(source, slow)], until=done, stop=["source"])
    assert max(source.ahead) <= 30, max(source.ahead)
    assert slow.stepped == source.made  # (and none was lost)


@pytest.mark.parametrize("keeps_up", [False, True])
async def test_a_node_held_back_by_a_slow_one_it_feeds_says_so_once(keeps_up, caplog, monkeypatch):
    monkeypatch.setattr(chimera._runtime, "HELD_WINDOW", 0.1)
    done = threading.Event()
    slow = Slow("slow", 0 if keeps_up else 0.02, 30, done)
    source = Paced("source", 0.02 if keeps_up else 0.001)
    with trio.fail_after(20):
        await run_pipeline([source, slow], [(source, slow)], until=done, stop=["source"])
    said = [r.getMessage() for r in caplog.records if r.name == "chimera.node.source"]
    if keeps_up:
        assert said == []
    else:
        assert len(said) == 1, said
        assert re.fullmatch(
            r"it waited \d+% of the time for 'slow' to take its chunks: it steps at their pace, "
            r"so that they miss none \(with delivery='latest' on the edge, it would keep its "
            r"own pace, and they would skip chunks\)",
            said[0],
        )


async def test_a_source_stops_after_its_current_step_and_what_it_made_arrives():
    class Slow(cp.Node):
        def prep(self):
            self.sent = 0

        def step(self):
            threading.Event().wait(0.005)
            self.sent += 1
            return self.sent

    done = threading.Event()
    source, sink = Slow("source"), Collect("sink", 5, done)
    with trio.fail_after(20):
        await run_pipeline([source, sink], [(source, sink)], until=done, stop=["source"])
    # Stopped within a step or two of the 5th chunk's arrival, not after the
    # dozens it may have queued on its thread; and nothing it made was lost.
    assert 5 <= source.sent < 15
    assert [chunks["source"] for chunks in sink.seen] == list(range(1, source.sent + 1))


async def test_a_followed_chunk_that_arrives_first_waits_for_the_other_inputs():
    # b sends three chunks before a sends its only one: none of b's is lost.
    b_sent, done = threading.Event(), threading.Event()
    a, b = Count("a", 1, gate=b_sent), Count("b", 3, sent_all=b_sent)
    sink = Collect("sink", 3, done)
    with trio.fail_after(20):
        await run_pipeline(
            [a, b, sink],
            [(a, sink), (b, sink)],
            follow={"sink": "b"},
            until=done,
            stop=["a", "b"],
        )
    assert sink.seen == [{"a": 1, "b": 1}, {"a": 1, "b": 2}, {"a": 1, "b": 3}]


async def test_prep_that_raises_is_a_node_error_with_the_traceback():
    class Broken(cp.Node):
        def prep(self):
            raise RuntimeError("no camera")

    node = Broken("cam")
    with trio.fail_after(10):
        async with NodeRuntime(node) as runtime:
            with pytest.raises(cp.NodeError) as caught:
                await runtime.prep()
    assert caught.value.node_name == "cam"
    assert "no camera" in str(caught.value)
    assert "RuntimeError: no camera" in caught.value.traceback
    assert node.state is cp.NodeState.FAILED
    copy = pickle.loads(pickle.dumps(caught.value))  # it travels from a Worker to the Manager
    assert (copy.node_name, str(copy), copy.traceback) == (
        "cam",
        str(caught.value),
        caught.value.traceback,
    )


@pytest.mark.parametrize("whose", ["the user's", "chimera.nodes"])
async def test_a_prep_that_raises_shows_the_traceback_of_the_nodes_code_alone(whose):
    # chimera's frames that call it say nothing to the user; but chimera's own
    # nodes (chimera.nodes) are a node's code, not chimera's calling it.
    filename = chimera._runtime._NODES if whose == "chimera.nodes" else __file__
    code = "class Broken(cp.Node):\n    def prep(self):\n        raise OSError('no camera')\n"
    namespace = {"cp": cp}
    exec(compile(code, filename, "exec"), namespace)
    with trio.fail_after(10):
        async with NodeRuntime(namespace["Broken"]("cam")) as runtime:
            with pytest.raises(cp.NodeError) as caught:
                await runtime.prep()
    frames = re.findall(r'File "([^"]+)", line \d+, in (\w+)', caught.value.traceback)
    assert frames == [(filename, "prep")]


class Flaky(cp.Node):
    torn_down = 0

    def step(self, data_chunks):
        value = data_chunks["count"].get("default")["value"]
        if value == 3:
            raise ValueError("bad frame")
        return value

    def teardown(self):
        self.torn_down += 1


class AsyncFlaky(Flaky):
    async def step(self, data_chunks):
        return Flaky.step(self, data_chunks)

    async def teardown(self):
        Flaky.teardown(self)


@pytest.mark.parametrize("flaky_type", [Flaky, AsyncFlaky])
async def test_a_step_that_raises_fails_its_node_only_and_teardown_still_runs(flaky_type, caplog):
    done = threading.Event()
    count, flaky, collect = Count("count", 5), flaky_type("flaky"), Collect("collect", 2, done)
    with trio.fail_after(20):
        _, states = await run_pipeline(
            [count, flaky, collect],
            [(count, flaky), (flaky, collect)],
            until=done,
            stop=["count"],
        )
    assert collect.seen == [{"flaky": 1}, {"flaky": 2}]
    assert flaky.state is cp.NodeState.FAILED and flaky.torn_down == 1
    # The log says where: the traceback of the user's code.
    (said,) = [r.getMessage() for r in caplog.records if "failed" in r.getMessage()]
    assert said.startswith("node 'flaky' failed: step raised ValueError('bad frame')\n")
    assert 'raise ValueError("bad frame")' in said and said.endswith("ValueError: bad frame")
    assert cp.NodeState.FAILED in states["flaky"]
    assert states["collect"][-2:] == [cp.NodeState.STOPPED, cp.NodeState.SHUTDOWN]


@pytest.mark.parametrize("transport", ["memory", "tcp"])
@pytest.mark.parametrize("flaky_type", [Flaky, AsyncFlaky])
async def test_a_failed_node_does_not_hold_up_its_inputs(flaky_type, transport):
    # The source runs on after its consumer failed: its other consumer gets
    # far more than the links hold, and the source still stops when asked.
    done = threading.Event()
    count, flaky = Count("count", 10**9), flaky_type("flaky")
    collect = Collect("collect", 3000, done)  # (the source batches: some 100 messages)
    with trio.fail_after(30):
        _, states = await run_pipeline(
            [count, flaky, collect],
            [(count, flaky), (count, collect)],
            until=done,
            stop=["count"],
            transport=transport,
        )
    assert [seen["count"] for seen in collect.seen[:3000]] == list(range(1, 3001))
    assert flaky.state is cp.NodeState.FAILED and flaky.torn_down == 1
    assert states["count"][-2:] == [cp.NodeState.STOPPED, cp.NodeState.SHUTDOWN]


async def test_an_input_that_ended_without_sending_is_said_once(caplog):
    class Silent(cp.Node):
        def step(self):
            threading.Event().wait(0.001)

    made = threading.Event()
    count, silent = Count("count", 5, sent_all=made), Silent("silent")
    collect = Collect("collect", 5, threading.Event())
    with trio.fail_after(20):
        await run_pipeline(
            [count, silent, collect],
            [(count, collect), (silent, collect)],
            follow={"collect": "count"},
            until=made,
            stop=["count", "silent"],
        )
    assert collect.seen == []  # never stepped: "silent" sent nothing
    said = [r.getMessage() for r in caplog.records if "ended without sending" in r.getMessage()]
    assert said == ["inputs ['silent'] ended without sending: it is not stepped"]


class SendsOnceThenFails(cp.Node):
    def prep(self):
        self.sent = False

    def step(self):
        if self.sent:
            raise RuntimeError("boom")
        self.sent = True
        return 1


async def test_a_followed_chunk_waits_for_an_input_yet_to_send_whatever_others_do(monkeypatch):
    # "once" sends, then fails: its stream ends; then "count" sends, and "late"
    # only after "count" has sent all: every chunk of "count" waits for it.
    made, done, once_ended = threading.Event(), threading.Event(), threading.Event()
    keep_latest = NodeRuntime._keep_latest

    async def keep_latest_telling(self, name, *args):
        await keep_latest(self, name, *args)
        if name == "once":
            once_ended.set()

    monkeypatch.setattr(NodeRuntime, "_keep_latest", keep_latest_telling)
    count, once = Count("count", 5, gate=once_ended, sent_all=made), SendsOnceThenFails("once")
    late, collect = Count("late", 1, gate=made), Collect("collect", 5, done)
    with trio.fail_after(20):
        await run_pipeline(
            [count, once, late, collect],
            [(count, collect), (once, collect), (late, collect)],
            follow={"collect": "count"},
            until=done,
            stop=["count", "late"],
        )
    assert collect.seen == [{"count": n, "late": 1, "once": 1} for n in range(1, 6)]


class ManyRecords(Count):
    """Sends 1..n, each in a chunk of *records* arrays (a frame each)."""

    def __init__(self, name, n, records):
        super().__init__(name, n)
        self.records = records

    def made(self, number):
        chunk = cp.DataChunk()
        chunk.add("default", number)
        for i in range(self.records):
            chunk.add(f"r{i}", np.full(4, number), "array")
        return chunk


@pytest.mark.parametrize("transport", ["memory", "tcp"])
async def test_chunks_of_many_arrays_travel_whole_however_many_go_at_once(transport):
    # 80 arrays a chunk: a message of 64 such chunks is over the 4096 frames
    # a message may have; they go in several.
    done = threading.Event()
    count, collect = ManyRecords("count", 300, 80), Collect("collect", 300, done)
    with trio.fail_after(30):
        await run_pipeline(
            [count, collect], [(count, collect)], until=done, stop=["count"], transport=transport
        )
    assert [seen["count"] for seen in collect.seen] == list(range(1, 301))


class Sized(Count):
    """Sends 1..n, chunk i with an array of ``sizes[i % len(sizes)]`` bytes, each i % 251."""

    def __init__(self, name, n, sizes):
        super().__init__(name, n)
        self.sizes = sizes

    def made(self, number):
        chunk = cp.DataChunk()
        chunk.add("default", number)
        size = self.sizes[number % len(self.sizes)]
        chunk.add("data", np.full(size, number % 251, np.uint8), "array")
        return chunk


class PassOn(cp.Node):
    """Sends on what its one input sends."""

    def step(self, data_chunks):
        (chunk,) = data_chunks.values()
        return chunk


class Check(Collect):
    """Keeps, for each chunk, its number and whether its array is whole."""

    def step(self, data_chunks):
        (chunk,) = data_chunks.values()
        index, data = chunk.get("default")["value"], chunk.get("data")["value"]
        self.seen.append((index, data.nbytes, bool((data == index % 251).all())))
        if len(self.seen) == self.n:
            self.done.set()


@pytest.mark.parametrize("transport", ["memory", "tcp"])  # (tcp: read on the nodes' threads)
async def test_chunks_small_and_large_pass_through_a_node_whole_and_in_order(transport):
    sizes = [10, 70_000, 1 << 20, 1000, 300_000]
    done = threading.Event()
    source, middle = Sized("source", 60, sizes), PassOn("middle")
    check = Check("check", 60, done)
    with trio.fail_after(30):
        await run_pipeline(
            [source, middle, check],
            [(source, middle), (middle, check)],
            until=done,
            stop=["source"],
            transport=transport,
        )
    assert check.seen == [(i, sizes[i % len(sizes)], True) for i in range(1, 61)]


class Returns(cp.Node):
    """A source whose every step returns *value*."""

    def __init__(self, name, value):
        super().__init__(name)
        self.value = value

    def step(self):
        return self.value


def _arrays(count: int, size: int) -> cp.DataChunk:
    chunk = cp.DataChunk()
    for i in range(count):
        chunk.add(f"r{i}", np.zeros(size, np.uint8), "array")
    return chunk


@pytest.mark.parametrize(
    ("value", "problem"),
    [
        (
            _arrays(5000, 1),
            "a chunk of 5000 arrays, table columns and pickled values: at most 4094",
        ),
        (
            _arrays(4095, 1),
            "a chunk of 4095 arrays, table columns and pickled values: at most 4094",
        ),
        (_arrays(1, 4096), "an array or pickled value of 4096 bytes: at most 1000 bytes"),
    ],
)
async def test_a_chunk_too_large_to_travel_fails_its_node_saying_why(
    monkeypatch, caplog, value, problem
):
    monkeypatch.setattr(transports, "DEFAULT_MAX_FRAME_SIZE", 1000)  # (256 MiB, as a test)
    source = Returns("source", value)
    with trio.fail_after(20):
        await run_pipeline([source], [])
    assert source.state is cp.NodeState.FAILED
    (said,) = [r.getMessage() for r in caplog.records if "failed" in r.getMessage()]
    assert said.startswith(f"node 'source' failed: step returned what cannot be sent: {problem}")


class Exits(Flaky):
    def step(self, data_chunks):
        if data_chunks["count"].get("default")["value"] == 3:
            raise self.raised("enough")
        return super().step(data_chunks)


class AsyncExits(Exits):
    async def step(self, data_chunks):
        return Exits.step(self, data_chunks)


@pytest.mark.parametrize(
    ("exits_type", "raised"),
    [(Exits, SystemExit), (Exits, KeyboardInterrupt), (AsyncExits, SystemExit)],
)
async def test_a_step_that_raises_systemexit_fails_its_node_like_any_other(exits_type, raised):
    # (An async step's KeyboardInterrupt is left to be Ctrl-C's: see test_process.py.)
    done = threading.Event()
    count, exits = Count("count", 5, sent_all=done), exits_type("exits")
    exits.raised = raised
    with trio.fail_after(20):
        _, states = await run_pipeline([count, exits], [(count, exits)], until=done, stop=["count"])
    assert exits.state is cp.NodeState.FAILED and exits.torn_down == 1
    assert states["count"][-2:] == [cp.NodeState.STOPPED, cp.NodeState.SHUTDOWN]


async def test_a_teardown_that_raises_still_closes_what_its_node_saved(tmp_path):
    class SavesThenRaises(cp.Node):
        def step(self, data_chunks):
            self.save_json("values", data_chunks["count"].get("default")["value"])

        def teardown(self):
            raise RuntimeError("teardown boom")

    done = threading.Event()
    count, node = Count("count", 40, sent_all=done), SavesThenRaises("saver")
    with trio.fail_after(20):
        async with NodeRuntime(count, outputs=1) as source:
            async with NodeRuntime(
                node, inputs=[Input("count")], folder=tmp_path / "saver"
            ) as sink:
                await sink.connect({"count": source.address})
                await source.prep()
                await sink.prep()
                await sink.set_recording(True)
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(source.run)
                    await trio.to_thread.run_sync(done.wait, 10)
                    source.request_stop()
                    with pytest.raises(cp.NodeError, match="teardown boom"):
                        await sink.run()
                # Closed at the end of the run (before a collect), not at shutdown.
                assert (tmp_path / "saver.saved.json").exists()
                lines = (tmp_path / "saver" / "values.jsonl").read_text().split()
    assert lines == [str(i) for i in range(1, 41)]
    assert node.state is cp.NodeState.FAILED


async def test_a_node_failed_by_a_full_disk_says_so_once(tmp_path, monkeypatch, caplog):
    import errno

    from chimera._recording import _WRITERS

    def no_room(self, data, stamp):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(_WRITERS["text"], "write", no_room)

    class SavesText(cp.Node):
        def step(self):
            self.save_text("notes", "a line\n")  # (raises once its writer failed)

    node = SavesText("notes")
    with trio.fail_after(20):
        async with NodeRuntime(node, folder=tmp_path / "notes") as runtime:
            await runtime.prep()
            await runtime.set_recording(True)
            await runtime.run()  # (the failure is the node's: no NodeError)
    assert node.state is cp.NodeState.FAILED
    failed = [r.getMessage() for r in caplog.records if "failed" in r.getMessage()]
    said = [text for text in failed if text.startswith("node 'notes' failed")]
    assert len(said) == 1 and "No space left on device" in said[0]


async def test_a_save_in_an_offline_step_is_said_not_recorded_as_a_warning(tmp_path, caplog):
    # (manager.step(): a ChimeraPy script may expect it recorded; it shows without logging set up)
    class SavesText(cp.Node):
        def step(self):
            self.save_text("notes", "a line\n")
            return 1

    node = SavesText("notes")
    with trio.fail_after(20):
        async with NodeRuntime(node, folder=tmp_path / "notes") as runtime:
            await runtime.prep()
            for _ in range(2):
                await runtime.step_once()
    said = [
        (r.levelname, r.getMessage()) for r in caplog.records if "not recorded" in r.getMessage()
    ]
    assert said == [
        (
            "WARNING",
            "text 'notes' is not recorded: saves are recorded in prep, and from start() (or "
            "record()) until stop(); not after prep until then, while previewing, or in step() "
            "(said once)",
        )
    ]
    assert not (tmp_path / "notes" / "notes.txt").exists()


async def test_a_save_not_recorded_after_an_offline_step_is_no_warning(tmp_path, caplog):
    # (As while previewing: the node is told it does not record; no news.)
    caplog.set_level(logging.INFO, logger="chimera.node")
    node = cp.Node("quiet")
    with trio.fail_after(20):
        async with NodeRuntime(node, folder=tmp_path / "quiet") as runtime:
            await runtime.prep()
            await runtime.step_once()
            node.save_text("notes", "a line\n")
    said = [r.levelname for r in caplog.records if "not recorded" in r.getMessage()]
    assert said == ["INFO"]


async def test_a_prep_asked_of_a_closed_node_is_refused_not_left_waiting():
    # (A Worker told to prep while it closes its nodes to leave.)
    node = Count("count", 1)
    with trio.fail_after(10):
        async with NodeRuntime(node) as runtime:
            await runtime.aclose()
            with pytest.raises(cp.NodeError, match="prep: the node is closed"):
                await runtime.prep()
    assert node.state is cp.NodeState.SHUTDOWN


class Raises(cp.Node):
    def step(self):
        raise ValueError("bad frame")


async def test_an_error_leaving_a_failed_nodes_block_keeps_the_reason_it_failed_for():
    said: list[tuple[cp.NodeState, str | None]] = []
    node = Raises("flaky")
    with trio.fail_after(10), pytest.raises(KeyError):
        async with NodeRuntime(node, on_state=lambda *change: said.append(change)) as runtime:
            await runtime.prep()
            await runtime.run()
            raise KeyError("later")
    failures = [reason for state, reason in said if state is cp.NodeState.FAILED]
    assert failures == ["step raised ValueError('bad frame')"]


class SaysWhenTornDown(Collect):
    def teardown(self):
        super().teardown()
        self.ended.set()


class WaitsForDownstreamInTeardown(Count):
    def teardown(self):
        self.saw_downstream_end = self.downstream_ended.wait(5)


async def test_a_slow_teardown_does_not_hold_up_the_end_of_the_nodes_downstream():
    # (The end of stream leaves as a node stops stepping, not once its teardown returned.)
    done, ended = threading.Event(), threading.Event()
    count, collect = WaitsForDownstreamInTeardown("count", 3), SaysWhenTornDown("collect", 3, done)
    count.downstream_ended, collect.ended = ended, ended
    with trio.fail_after(20):
        await run_pipeline([count, collect], [(count, collect)], until=done, stop=["count"])
    assert collect.seen == [{"count": 1}, {"count": 2}, {"count": 3}]
    assert count.saw_downstream_end


async def test_a_source_steps_only_once_its_consumers_are_connected():
    import transports

    count = Count("count", 3)
    with trio.fail_after(10):
        async with NodeRuntime(count, outputs=1) as runtime, trio.open_nursery() as nursery:
            await runtime.prep()
            nursery.start_soon(runtime.run)
            await trio.testing.wait_all_tasks_blocked()
            assert count.state is cp.NodeState.READY and count.sent == 0
            async with await transports.connect(runtime.address, label="late") as inlet:
                message = await inlet.receive()
                runtime.request_stop()
    from chimera._batch import unpack_batch
    from chimera._data import decode_chunk

    first, batch = unpack_batch(message)
    assert first == 0
    assert decode_chunk(batch[0]).get("default")["value"] == 1


async def test_cancelling_a_run_still_runs_teardown_once():
    class Slow(cp.Node):
        torn_down = 0

        def step(self):
            threading.Event().wait(0.001)

        def teardown(self):
            self.torn_down += 1

    node = Slow("slow")
    with trio.fail_after(10):
        async with NodeRuntime(node) as runtime:
            await runtime.prep()
            with trio.move_on_after(0.05):
                await runtime.run()
    assert node.torn_down == 1
    assert node.state is cp.NodeState.SHUTDOWN


def test_follow_must_name_an_input():
    with pytest.raises(ValueError, match="follow='c'"):
        NodeRuntime(cp.Node("n"), inputs=[Input("a"), Input("b")], follow="c")


async def test_a_nodes_code_runs_on_one_thread_of_its_own():
    class WhereAmI(cp.Node):
        def prep(self):
            self.threads = {threading.get_ident()}

        def step(self, data_chunks):
            self.threads.add(threading.get_ident())
            if data_chunks["count"].get("default")["value"] == 20:
                done.set()

        def teardown(self):
            self.threads.add(threading.get_ident())

    done = threading.Event()
    count, where = Count("count", 20), WhereAmI("where")
    with trio.fail_after(20):
        async with NodeRuntime(count, outputs=1) as source:
            async with NodeRuntime(where, inputs=[Input("count")]) as sink:
                await sink.connect({"count": source.address})
                await source.prep()
                await sink.prep()
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(sink.run)
                    nursery.start_soon(source.run)
                    await trio.to_thread.run_sync(done.wait, 10)
                    source.request_stop()
    assert len(where.threads) == 1
    assert threading.get_ident() not in where.threads
    assert where.state is cp.NodeState.SHUTDOWN


async def run_on_input(node: cp.Node, messages=([b"not a chunk"],), transport="memory") -> None:
    """Run *node* with one input, which sends it *messages* (by default, one
    that is not a chunk), then ends."""
    import transports

    with trio.fail_after(20):
        async with await transports.bind(BIND[transport]) as outlet:
            async with NodeRuntime(node, inputs=[Input("source")], transport=transport) as runtime:
                await runtime.connect({"source": outlet.address})
                await runtime.prep()
                for message in messages:
                    await outlet.send(message)
                await outlet.aclose()
                await runtime.run()


#: A bind address on loopback, by transport.
BIND = {"memory": "memory://", "tcp": "tcp://127.0.0.1:0"}


@pytest.mark.parametrize("transport", ["memory", "tcp"])  # (tcp: read on the node's thread)
async def test_a_chunk_that_cannot_be_decoded_fails_the_node_and_teardown_runs(transport):
    collect = Collect("collect", 1, threading.Event())
    await run_on_input(collect, transport=transport)
    assert collect.state is cp.NodeState.FAILED
    assert collect.seen == [] and collect.torn_down == 1


def batch_of(value: int):
    """A message as a node sends it: chunk number *value* - 1, its record "default" *value*."""
    from chimera._batch import pack_batch
    from chimera._data import encode_chunk

    chunk = cp.DataChunk()
    chunk.add("default", value)
    return pack_batch([encode_chunk(chunk)], value - 1)


@pytest.mark.parametrize("transport", ["memory", "tcp"])
async def test_a_chunk_that_comes_again_fails_the_node_and_is_not_stepped_twice(transport, caplog):
    collect = Collect("collect", 10, threading.Event())
    messages = [batch_of(1), batch_of(2), batch_of(2), batch_of(3)]
    await run_on_input(collect, messages, transport=transport)
    # (The steps of what came before may be left undone: the node fails at once.)
    assert collect.seen in ([], [{"source": 1}], [{"source": 1}, {"source": 2}])
    assert collect.state is cp.NodeState.FAILED and collect.torn_down == 1
    (said,) = [r.getMessage() for r in caplog.records if "failed" in r.getMessage()]
    assert "chunk 1 came after chunk 1" in said


@pytest.mark.parametrize("transport", ["memory", "tcp"])
async def test_a_node_whose_consumer_froze_ends_once_that_consumer_is_forgotten(transport, caplog):
    # A consumer whose process froze keeps its connection open and takes in
    # nothing more: once its link is full, the node's sends wait for it for
    # ever, and so does the end of its run (and the stop of the cluster).
    import transports

    first, second = threading.Event(), threading.Event()
    relay, sink = Double("double"), Collect("sink", 1, first)
    bind = "memory://" if transport == "memory" else "tcp://127.0.0.1:0"
    with trio.fail_after(20):
        async with (
            await transports.bind(bind) as count,
            NodeRuntime(relay, inputs=[Input("count")], outputs=2, transport=transport) as runtime,
            NodeRuntime(sink, inputs=[Input("double")], transport=transport) as reader,
        ):
            await runtime.connect({"count": count.address})
            await reader.connect({"double": runtime.address})
            frozen = await transports.connect(runtime.address, capacity=1, label="frozen")
            for each in (runtime, reader):
                await each.prep()
            async with trio.open_nursery() as nursery:
                nursery.start_soon(runtime.run)
                nursery.start_soon(reader.run)
                await count.send(batch_of(1))
                await trio.to_thread.run_sync(first.wait, 10)  # and the frozen link is full
                sink.n, sink.done = 2, second
                await count.send(batch_of(2))
                await trio.testing.wait_all_tasks_blocked(0.05)
                assert len(sink.seen) == 1  # the relay waits for the frozen consumer
                await runtime.forget(["frozen", "no such node"])
                await trio.to_thread.run_sync(second.wait, 10)
                await count.aclose()
            assert relay.state is cp.NodeState.STOPPED and sink.state is cp.NodeState.STOPPED
            await frozen.aclose()
    assert sink.seen == [{"double": 2}, {"double": 4}]
    said = [(r.name, r.getMessage()) for r in caplog.records if "gone" in r.getMessage()]
    assert said == [
        (
            "chimera.node.double",
            "node 'frozen' is gone: its link is cut, with what it had not taken in",
        )
    ]


@pytest.mark.parametrize("follow", [True, False], ids=["followed", "other"])
async def test_a_node_whose_input_froze_ends_once_that_input_is_forgotten(follow, caplog):
    # Its input's process froze: no end of stream will ever come.
    import transports

    done = threading.Event()
    sink = Collect("sink", 1, done)
    with trio.fail_after(20):
        async with (
            await transports.bind("memory://") as frozen,
            await transports.bind("memory://") as alive,
            NodeRuntime(
                sink, inputs=[Input("frozen"), Input("alive")], follow=None if follow else "alive"
            ) as runtime,
        ):
            await runtime.connect({"frozen": frozen.address, "alive": alive.address})
            await runtime.prep()
            async with trio.open_nursery() as nursery:
                nursery.start_soon(runtime.run)
                await frozen.send(batch_of(1))
                await alive.send(batch_of(1))
                await trio.to_thread.run_sync(done.wait, 10)
                await runtime.forget(["frozen"])
                if not follow:  # it goes on with the input it follows, until that ends
                    await alive.send(batch_of(2))
                    await alive.aclose()
            assert sink.state is cp.NodeState.STOPPED and sink.torn_down == 1
    expected = [{"alive": 1, "frozen": 1}]
    assert sink.seen == expected + ([] if follow else [{"alive": 2, "frozen": 1}])
    said = [(r.name, r.getMessage()) for r in caplog.records if "gone" in r.getMessage()]
    assert said == [("chimera.node.sink", "input 'frozen' is gone: its stream is taken as ended")]


@dataclass
class Running:
    """A node running on one input, from :func:`running_on_one_input`."""

    source: transports.Outlet
    runtime: NodeRuntime
    #: Set once its run returned; cancelling it cancels the run.
    ended: trio.Event
    scope: trio.CancelScope


@asynccontextmanager
async def running_on_one_input(node: Collect, transport: str, values: list[int]):
    """Run *node* on one input, "source", over *transport*: once the source
    has sent a chunk of each of *values* and the node stepped on as many
    (its *done* set), yield them, the run going on."""
    async with (
        await transports.bind(BIND[transport]) as source,
        NodeRuntime(node, inputs=[Input("source")], transport=transport) as runtime,
    ):
        await runtime.connect({"source": source.address})
        await runtime.prep()
        async with trio.open_nursery() as nursery:
            ended = trio.Event()

            async def run() -> None:
                await runtime.run()
                ended.set()

            nursery.start_soon(run)
            for value in values:
                await source.send(batch_of(value))
            await trio.to_thread.run_sync(node.done.wait, 10)
            yield Running(source, runtime, ended, nursery.cancel_scope)


@pytest.mark.parametrize("transport", ["memory", "tcp"])  # (tcp: read on the node's thread)
async def test_a_node_waiting_on_its_one_input_ends_once_that_input_is_forgotten(transport, caplog):
    sink = Collect("sink", 1, threading.Event())
    with trio.fail_after(20):
        async with running_on_one_input(sink, transport, [1]) as running:
            await running.runtime.forget(["source"])  # (its thread waits for the next chunk)
            await running.ended.wait()
            assert sink.state is cp.NodeState.STOPPED and sink.torn_down == 1
    assert sink.seen == [{"source": 1}]
    said = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert said == ["input 'source' is gone: its stream is taken as ended"]


@pytest.mark.parametrize("transport", ["memory", "tcp"])
async def test_a_node_whose_one_input_broke_ends_saying_so(transport, caplog):
    sink = Collect("sink", 2, threading.Event())
    with trio.fail_after(20):
        async with running_on_one_input(sink, transport, [1, 2]) as running:
            assert running.source.cut("sink") == 1  # (its inlet is labelled with its name)
            await running.ended.wait()
            assert sink.state is cp.NodeState.STOPPED and sink.torn_down == 1
    assert sink.seen == [{"source": 1}, {"source": 2}]
    said = [r.getMessage() for r in caplog.records if r.name == "chimera.node.sink"]
    assert len(said) == 1 and said[0].startswith("input 'source' broke: ")


@pytest.mark.parametrize("transport", ["memory", "tcp"])
async def test_cancelling_a_run_waiting_on_its_input_runs_teardown_once_and_leaves_no_thread(
    transport,
):
    sink = Collect("sink", 1, threading.Event())
    with trio.fail_after(20):
        async with running_on_one_input(sink, transport, [1]) as running:
            running.scope.cancel()  # (its thread waits for the next chunk)
    assert sink.torn_down == 1 and sink.state is cp.NodeState.SHUTDOWN
    assert not [t for t in threading.enumerate() if t.name == "chimera-node-sink"]


async def test_a_def_step_on_one_reliable_input_steps_while_its_event_loop_is_held_up():
    # Its thread reads the input itself: the event loop, here held up by a
    # blocking call, is not on the chunks' way in (nor on the chunk's way
    # out, for one that comes alone: see test_send_now).
    stepped = threading.Event()
    sink = Collect("sink", 3, stepped)
    addresses: list[str] = []
    bound, go = threading.Event(), threading.Event()

    def source_elsewhere() -> None:  # (another event loop, on a thread of its own)
        async def main() -> None:
            async with await transports.bind("tcp://127.0.0.1:0") as outlet:
                addresses.append(outlet.address)
                bound.set()
                await outlet.wait_for_inlets()
                await trio.to_thread.run_sync(go.wait, 10)
                for value in (1, 2, 3):
                    await outlet.send(batch_of(value))

        trio.run(main)

    source = threading.Thread(target=source_elsewhere)
    source.start()
    try:
        with trio.fail_after(20):
            await trio.to_thread.run_sync(bound.wait, 10)
            async with NodeRuntime(sink, inputs=[Input("source")], transport="tcp") as runtime:
                await runtime.connect({"source": addresses[0]})
                await runtime.prep()
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(runtime.run)
                    await trio.testing.wait_all_tasks_blocked()
                    go.set()
                    held_up_for_all_three = stepped.wait(10)  # (blocks the event loop)
                    nursery.cancel_scope.cancel()
    finally:
        go.set()
        source.join(10)
    assert held_up_for_all_three
    assert sink.seen == [{"source": 1}, {"source": 2}, {"source": 3}]


class Looping(cp.Node):
    """A source with its own main loop: counts turns until told to stop."""

    def __init__(self, name, started):
        super().__init__(name)
        self.started, self.turns, self.threads, self.torn_down = started, 0, set(), 0

    def main(self):
        self.threads.add(threading.get_ident())
        while self.running:
            self.turns += 1
            if self.turns == 3:
                self.started.set()
            threading.Event().wait(0.001)

    def teardown(self):
        self.torn_down += 1


class Watching(cp.Node):
    """Its own main loop over its inputs: keeps each new value of its followed input."""

    def __init__(self, name):
        super().__init__(name)
        self.values = []

    def main(self):
        while True:
            if self.new_data_available:
                self.new_data_available = False
                self.values.append(self.in_bound_data["count"].get("default")["value"])
            elif not self.running:
                return
            else:
                threading.Event().wait(0.0005)


async def test_a_source_that_overrides_main_runs_it_until_asked_to_stop():
    started = threading.Event()
    source = Looping("source", started)
    with trio.fail_after(20):
        _, states = await run_pipeline([source], [], until=started, stop=["source"])
    assert source.turns >= 3 and source.torn_down == 1
    assert threading.get_ident() not in source.threads
    assert states["source"][-2:] == [cp.NodeState.STOPPED, cp.NodeState.SHUTDOWN]


async def test_a_node_that_overrides_main_sees_its_inputs_and_ends_with_them():
    done = threading.Event()
    count = Count("count", 20, sent_all=done)
    watching = Watching("watching")
    with trio.fail_after(20):
        _, states = await run_pipeline(
            [count, watching], [(count, watching)], until=done, stop=["count"]
        )
    # Newer values each time (main may miss some: it sees the latest), the last one last.
    assert watching.values == sorted(set(watching.values)) and watching.values[-1] == 20
    assert not watching.running
    assert states["watching"][-2:] == [cp.NodeState.STOPPED, cp.NodeState.SHUTDOWN]


async def test_a_main_that_raises_fails_its_node_and_teardown_still_runs():
    class Broken(Looping):
        def main(self):
            raise RuntimeError("lost the device")

    broken = Broken("broken", threading.Event())
    with trio.fail_after(20):
        _, states = await run_pipeline([broken], [])
    assert broken.torn_down == 1
    assert broken.state is cp.NodeState.FAILED
    assert cp.NodeState.STOPPED not in states["broken"]


async def test_a_chunk_that_cannot_be_decoded_ends_a_main_and_fails_its_node():
    watching = Watching("watching")
    await run_on_input(watching)
    assert watching.state is cp.NodeState.FAILED
    assert watching.values == [] and not watching.running


# --- async def: steps on the event loop ---------------------------------------------


class AsyncCount(cp.Node):
    """Sends 1..n from ``async def`` methods, then awaits until it is stopped."""

    def __init__(self, name, n, sent_all):
        super().__init__(name)
        self.n, self.sent_all, self.threads = n, sent_all, set()

    async def prep(self):
        self.sent = 0

    async def step(self):
        self.threads.add(threading.get_ident())
        if self.sent == self.n:
            self.sent_all.set()
            await trio.sleep_forever()  # a stop cancels the step here
        self.sent += 1
        return self.sent


class AsyncCollect(Collect):
    async def step(self, data_chunks):
        await trio.lowlevel.checkpoint()
        super().step(data_chunks)
        self.threads = getattr(self, "threads", set()) | {threading.get_ident()}

    async def teardown(self):
        await trio.lowlevel.checkpoint()
        self.torn_down += 1


@pytest.mark.parametrize("transport", ["memory", "tcp"])
async def test_async_steps_run_on_the_event_loop_every_chunk_once_in_order(transport):
    sent_all, done = threading.Event(), threading.Event()
    count = AsyncCount("count", 40, sent_all)
    double, collect = Double("double"), AsyncCollect("collect", 40, done)
    with trio.fail_after(20):
        runtimes, states = await run_pipeline(
            [count, double, collect],
            [(count, double), (double, collect)],
            until=sent_all,
            stop=["count"],
            transport=transport,
        )
    assert collect.seen == [{"double": 2 * i} for i in range(1, 41)]
    assert collect.torn_down == 1
    assert count.threads == collect.threads == {threading.get_ident()}  # this test's loop
    assert (
        states["count"][-2:]
        == states["collect"][-2:]
        == [
            cp.NodeState.STOPPED,
            cp.NodeState.SHUTDOWN,
        ]
    )
    assert runtimes["collect"].steps == 40


async def test_an_async_prep_that_raises_is_a_node_error():
    class Broken(cp.Node):
        async def prep(self):
            raise OSError("no device")

    node = Broken("broken")
    with trio.fail_after(10):
        async with NodeRuntime(node) as runtime:
            with pytest.raises(cp.NodeError, match="no device"):
                await runtime.prep()
    assert node.state is cp.NodeState.FAILED


async def test_an_async_main_runs_on_the_event_loop_until_asked_to_stop():
    class AsyncLooping(Looping):
        async def main(self):
            self.threads.add(threading.get_ident())
            while self.running:
                self.turns += 1
                if self.turns == 3:
                    self.started.set()
                await trio.sleep(0.001)

    started = threading.Event()
    source = AsyncLooping("source", started)
    with trio.fail_after(20):
        _, states = await run_pipeline([source], [], until=started, stop=["source"])
    assert source.turns >= 3 and source.torn_down == 1
    assert source.threads == {threading.get_ident()}
    assert states["source"][-2:] == [cp.NodeState.STOPPED, cp.NodeState.SHUTDOWN]


async def test_an_async_source_whose_step_never_awaits_still_stops():
    started = threading.Event()

    class Busy(cp.Node):
        turns = 0

        async def step(self):  # no await: it must not starve the event loop
            self.turns += 1
            if self.turns == 100:
                started.set()

    busy = Busy("busy")
    with trio.fail_after(20):
        _, states = await run_pipeline([busy], [], until=started, stop=["busy"])
    assert busy.turns >= 100
    assert states["busy"][-2:] == [cp.NodeState.STOPPED, cp.NodeState.SHUTDOWN]


def test_data_chunks_say_why_a_name_is_missing():
    import pickle

    from chimera._runtime import Inputs

    inputs = Inputs({"cam": cp.DataChunk()}, ("cam", "mic"))
    with pytest.raises(KeyError, match="'mic': that input has sent no chunk yet"):
        inputs["mic"]
    with pytest.raises(KeyError, match="'camera' is not an input of this node: its inputs are"):
        inputs["camera"]
    copy = pickle.loads(pickle.dumps(inputs))  # (a node may send it on, or keep it)
    assert list(copy) == ["cam"] and isinstance(copy, dict)
