"""Whole-cluster properties (hypothesis) with every node in a child process (tcp).

The same property as test_cluster_properties.py -- random DAGs, random
mappings over 1-2 Workers, a clean stop or a cancellation at a random point --
with the nodes in processes of their own. They import this module there, and
report what they did in a JSON-lines file per node (appended line by line), and
each emission of a source to the test (nodes.notify). After the cluster's
blocks exit, nothing they opened may remain: no process, no node thread, no
listening port.
"""

from __future__ import annotations

import itertools
import json
import os
import threading
from pathlib import Path

import pytest
import trio
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

import chimera as cp

from .nodes import notify
from .test_process import alive, cluster, notifications

#: Each example writes under a folder of its own (hypothesis reuses tmp_path).
_runs = itertools.count()
#: The Manager's node states, in order; a cancellation may wait for one of them.
STATES = ["INITIALIZED", "CONNECTED", "READY", "RUNNING", "STOPPED"]


def _log(folder: str, name: str, **entry) -> None:
    """Append one line to the node's file (opened and closed: on disk at once)."""
    with open(Path(folder, f"{name}.jsonl"), "a", encoding="utf-8") as file:
        file.write(json.dumps(entry) + "\n")


class Source(cp.Node):
    """Emits 1..n, telling the test each time (``emit NAME K``); then idles
    (``done NAME`` once: its last chunk is out of its step)."""

    def __init__(self, name: str, folder: str, n: int, port: int) -> None:
        super().__init__(name)
        self.folder, self.n, self.port = folder, n, port

    def prep(self):
        self.emitted = 0
        self.done = False
        _log(self.folder, self.name, prep=os.getpid())

    def step(self):
        if self.emitted == self.n:
            if not self.done:
                self.done = True
                notify(self.port, f"done {self.name}".encode())
            threading.Event().wait(0.001)
            return None
        self.emitted += 1
        _log(self.folder, self.name, emit=self.emitted)
        notify(self.port, f"emit {self.name} {self.emitted}".encode())
        return self.emitted

    def teardown(self):
        _log(self.folder, self.name, teardown=os.getpid())


class Relay(cp.Node):
    """Steps on its followed input (logs the value it got); emits its step count."""

    def __init__(self, name: str, folder: str, follow: str) -> None:
        super().__init__(name)
        self.folder, self.follow = folder, follow

    def prep(self):
        self.emitted = 0
        _log(self.folder, self.name, prep=os.getpid())

    def step(self, data_chunks):
        value = data_chunks[self.follow].get("default")["value"]
        self.emitted += 1
        _log(self.folder, self.name, step=value, emit=self.emitted)
        return self.emitted

    def teardown(self):
        _log(self.folder, self.name, teardown=os.getpid())


@st.composite
def clusters(draw):
    """(names, {node: its inputs}, {relay: followed input}, {source: n}, workers, mapping)."""
    count = draw(st.integers(2, 4))
    names = [f"n{i}" for i in range(count)]
    inputs: dict[str, list[str]] = {name: [] for name in names}
    for j in range(1, count):
        for i in range(j):
            if draw(st.booleans()):
                inputs[names[j]].append(names[i])
    follows = {name: draw(st.sampled_from(srcs)) for name, srcs in inputs.items() if srcs}
    sources = {name: draw(st.integers(1, 5)) for name in names if not inputs[name]}
    workers = [f"w{i}" for i in range(draw(st.integers(1, 2)))]
    mapping: dict[str, list[str]] = {}
    for name in names:
        mapping.setdefault(draw(st.sampled_from(workers)), []).append(name)
    return names, inputs, follows, sources, workers, mapping


#: None: a clean stop. Else when to cancel the cluster's block:
#: ("checkpoints", c): c Trio checkpoints into commit_graph;
#: ("state", i, s): once node i is in state s (or a later one) for the Manager;
#: ("emissions", e): once the sources have emitted e chunks in all.
cancellations = st.one_of(
    st.none(),
    st.tuples(st.just("checkpoints"), st.integers(0, 50)),
    st.tuples(st.just("state"), st.integers(0, 3), st.sampled_from(STATES)),
    st.tuples(st.just("emissions"), st.integers(0, 20)),
)


def _build(folder: str, port: int, names, inputs, follows, sources) -> cp.Graph:
    nodes = {
        name: Source(name, folder, sources[name], port)
        if name in sources
        else Relay(name, folder, follows[name])
        for name in names
    }
    graph = cp.Graph()
    graph.add_nodes_from(nodes.values())
    for name in names:
        for src in inputs[name]:
            graph.add_edge(nodes[src], nodes[name], follow=follows[name] == src)
    return graph


# --- what this process has open ---------------------------------------------------


def _descendants(pid: int) -> dict[int, str]:
    """Every process below *pid* (by ppid chains, zombies included): its command line."""
    parents = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as stat:
                    parents[int(entry)] = int(stat.read().rsplit(")", 1)[1].split()[1])
            except (FileNotFoundError, ProcessLookupError, IndexError):
                continue
    found: dict[int, str] = {}
    frontier = [pid]
    while frontier:
        parent = frontier.pop()
        for child, ppid in parents.items():
            if ppid == parent and child not in found:
                found[child] = _cmdline(child)
                frontier.append(child)
    return found


def _in_groups_of(leaders: set[int]) -> dict[int, str]:
    """The live processes in the process group or session one of *leaders* leads
    (a node process leads both: what it started stays in them, even orphaned)."""
    found = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as stat:
                    state, _, group, session = stat.read().rsplit(")", 1)[1].split()[:4]
            except (FileNotFoundError, ProcessLookupError, ValueError):
                continue
            if state != "Z" and leaders & {int(group), int(session)}:
                found[int(entry)] = _cmdline(int(entry))
    return found


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as file:
            return file.read().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return "?"


def _listening() -> set[str]:
    """The TCP sockets of this process that listen (``tcp ADDRESS:PORT``, hex as in /proc)."""
    inodes = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[len("socket:[") : -1])
    found = set()
    for table in ("tcp", "tcp6"):
        try:
            with open(f"/proc/self/net/{table}") as file:
                rows = file.read().splitlines()[1:]
        except FileNotFoundError:
            continue
        for row in rows:
            fields = row.split()
            if fields[3] == "0A" and fields[9] in inodes:  # LISTEN
                found.add(f"{table} {fields[1]} (inode {fields[9]})")
    return found


def _node_threads() -> set[tuple[int | None, str]]:
    return {(t.ident, t.name) for t in threading.enumerate() if t.name.startswith("chimera-")}


def _snapshot() -> dict:
    return {
        "processes": _descendants(os.getpid()),
        "threads": _node_threads(),
        "listening": _listening(),
    }


# --- one example -------------------------------------------------------------


async def _run(folder: Path, cluster_spec, cancel):
    """Run the cluster; (whether it was cancelled, the states after stop, snapshots)."""
    before = _snapshot()
    with trio.fail_after(60):
        cancelled, states = await _run_cluster(folder, cluster_spec, cancel)
    return cancelled, states, before, _snapshot()


async def _run_cluster(folder: Path, cluster_spec, cancel):
    names, inputs, follows, sources, workers, mapping = cluster_spec
    states = None
    async with notifications() as (port, notified):
        graph = _build(str(folder), port, names, inputs, follows, sources)
        async with cluster(folder, *workers) as manager:
            with trio.CancelScope() as scope:
                async with trio.open_nursery() as nursery:
                    kind = cancel[0] if cancel else None
                    if kind == "checkpoints":

                        async def cancel_after_checkpoints(count: int) -> None:
                            for _ in range(count):
                                await trio.lowlevel.checkpoint()
                            scope.cancel()

                        nursery.start_soon(cancel_after_checkpoints, cancel[1])
                    elif kind == "state":

                        async def cancel_at_state(node: str, state: str) -> None:
                            later = [*STATES[STATES.index(state) :], "SHUTDOWN", "FAILED"]
                            await manager.wait_for_node_state(node, *later)
                            scope.cancel()

                        # Started once the graph is registered (commit_graph
                        # does that before it first waits).
                        node = names[cancel[1] % len(names)]
                        nursery.start_soon(cancel_at_state, node, cancel[2])
                    # An emission count the sources reach (else no cancellation).
                    emissions = min(cancel[1], sum(sources.values())) if kind == "emissions" else -1

                    assert await manager.commit_graph(graph, mapping)
                    assert await manager.start()
                    emitted, done = 0, set()
                    while len(done) < len(sources):
                        if emitted == emissions:
                            scope.cancel()
                        what, name, *_ = (await notified.receive()).decode().split()
                        if what == "emit":
                            emitted += 1
                        else:
                            done.add(name)
                    # Every source has emitted its n: stop; every chunk is stepped.
                    assert await manager.stop()
                    # stop returns once every node has stopped: the Manager
                    # knows it then (a Worker's reply must not overtake the
                    # node states it reports).
                    states = dict(manager.nodes)
                    await manager.shutdown()
                    nursery.cancel_scope.cancel()
    return scope.cancelled_caught, states


def _read(folder: Path, name: str) -> list[dict]:
    path = folder / f"{name}.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines()]


def _check(folder: Path, cluster_spec, cancel, cancelled, states, before, after) -> None:
    names, _, follows, sources, _, _ = cluster_spec
    logs = {name: _read(folder, name) for name in names}
    prepped = {name: [e["prep"] for e in lines if "prep" in e] for name, lines in logs.items()}
    teardowns = {name: [e for e in lines if "teardown" in e] for name, lines in logs.items()}
    emitted = {name: [e["emit"] for e in lines if "emit" in e] for name, lines in logs.items()}
    stepped = {name: [e["step"] for e in lines if "step" in e] for name, lines in logs.items()}
    how = "cancelled" if cancelled else "stopped"
    event(f"{how} (cancellation drawn: {cancel[0] if cancel else None})")

    for name in names:
        assert len(prepped[name]) <= 1, f"{name}: prep ran {len(prepped[name])} times"
        for pid in prepped[name]:
            assert pid != os.getpid(), f"{name}: ran in the test's process, not a child"
        assert emitted[name] == list(range(1, len(emitted[name]) + 1)), (
            f"{name}: emitted {emitted[name]}, not 1, 2, ... in order"
        )
        # teardown: once if prep ran (at most once when cancelled), never otherwise.
        expected = 1 if prepped[name] else 0
        if cancelled:
            assert len(teardowns[name]) <= expected, (
                f"{name} ({how}): {len(teardowns[name])} teardowns, prep ran "
                f"{len(prepped[name])} times"
            )
        else:
            assert len(teardowns[name]) == expected == 1, (
                f"{name} ({how}): {len(teardowns[name])} teardowns, prep ran "
                f"{len(prepped[name])} times"
            )
        if teardowns[name]:
            assert logs[name][-1] == teardowns[name][0], (
                f"{name} ({how}): did something after its teardown: {logs[name]}"
            )
        if logs[name]:
            assert "prep" in logs[name][0], f"{name} ({how}): did something before prep"

    for name, follow in follows.items():
        # RELIABLE: each chunk of the followed input stepped on once, in order;
        # all of them after a clean stop, a prefix of them when cancelled.
        got, sent = stepped[name], emitted[follow]
        assert got == sent[: len(got)], (
            f"{name} ({how}) stepped on {got} of {follow}'s {sent}: "
            "not once each, in order (a duplicate, a loss or a reordering)"
        )
        if not cancelled:
            assert got == sent, f"{name} (stopped) stepped on {got} of {follow}'s {sent}"
    if not cancelled:
        for name, n in sources.items():
            assert emitted[name] == list(range(1, n + 1)), f"{name}: emitted {emitted[name]}"
        assert set(states.values()) == {"STOPPED"}, f"states as stop returned: {states}"

    # Nothing the cluster opened remains.
    left = {pid: cmd for pid, cmd in after["processes"].items() if pid not in before["processes"]}
    assert not left, f"({how}) processes left behind under the test's process: {left}"
    # Node processes lead process groups (and sessions) of their own: orphaned,
    # they and what they started would escape the walk above.
    for name in names:
        for pid in prepped[name]:
            assert not alive(pid), f"({how}) {name}'s process {pid} is still alive"
    nodes = {pid for pids in prepped.values() for pid in pids}
    strays = _in_groups_of(nodes)
    assert not strays, f"({how}) processes left in the node processes' groups: {strays}"
    threads = after["threads"] - before["threads"]
    assert not threads, f"({how}) chimera threads left in the test's process: {threads}"
    ports = after["listening"] - before["listening"]
    assert not ports, f"({how}) listening TCP sockets left open by the test's process: {ports}"


def _example(tmp_path: Path, cluster_spec, cancel) -> None:
    folder = tmp_path / f"run{next(_runs)}"
    folder.mkdir()
    cancelled, states, before, after = trio.run(_run, folder, cluster_spec, cancel)
    _check(folder, cluster_spec, cancel, cancelled, states, before, after)


_SETTINGS = {
    "deadline": None,
    "suppress_health_check": [HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
}


@settings(max_examples=8, **_SETTINGS)
@given(cluster_spec=clusters(), cancel=cancellations)
def test_nodes_in_processes_step_every_chunk_once_in_order_and_leave_nothing(
    tmp_path, cluster_spec, cancel
):
    _example(tmp_path, cluster_spec, cancel)


@pytest.mark.slow
@settings(max_examples=60, **_SETTINGS)
@given(cluster_spec=clusters(), cancel=cancellations)
def test_nodes_in_processes_step_every_chunk_once_in_order_and_leave_nothing_more_examples(
    tmp_path, cluster_spec, cancel
):
    _example(tmp_path, cluster_spec, cancel)
