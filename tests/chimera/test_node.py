"""The user's side of a node: construction, defaults, and what a Graph needs of it."""

from __future__ import annotations

import pickle

import cloudpickle
import pytest
import trio

import chimera as cp


def test_a_node_has_a_name_a_unique_id_and_starts_initialized():
    a, b = cp.Node("camera"), cp.Node("camera")
    assert a.name == "camera" and a.id != b.id
    assert a.state is cp.NodeState.INITIALIZED
    assert a.get_logger() is a.logger
    assert a.logger.name == "chimera.node.camera"
    assert "camera" in repr(a) and "INITIALIZED" in repr(a)


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"name": 3}, TypeError, "name is a str"),
        ({"name": ""}, ValueError, "is not a valid file name"),
        ({"name": "../up"}, ValueError, "is not a valid file name"),
        ({"name": "a/b"}, ValueError, "is not a valid file name"),
        ({"name": "n", "debug": "verbose"}, ValueError, "debug must be one of"),
        ({"name": "n", "debug_port": "9000"}, TypeError, "debug_port"),
        ({"name": "n", "debug_port": True}, TypeError, "debug_port"),
    ],
)
def test_bad_arguments_are_refused(kwargs, error, message):
    with pytest.raises(error, match=message):
        cp.Node(**kwargs)


def test_the_defaults_do_nothing_and_step_sends_nothing():
    node = cp.Node("n", debug="step", debug_port=9100)
    assert node.prep() is None
    assert node.step() is None
    assert node.step({"up": cp.DataChunk()}) is None
    assert node.teardown() is None


@pytest.mark.parametrize(
    ("method", "args"),
    [
        ("save_video", ("v", None, 30)),
        ("save_audio", ("a", None, 1, 8, 16000)),
        ("save_image", ("i", None)),
        ("save_tabular", ("t", {})),
        ("save_json", ("j", {})),
        ("save_text", ("x", "")),
    ],
)
def test_saving_outside_a_cluster_is_an_error_not_a_silent_loss(method, args):
    with pytest.raises(RuntimeError, match="save_\\* works once the node runs in a cluster"):
        getattr(cp.Node("n"), method)(*args)


class Counter(cp.Node):
    def prep(self):
        self.count = 0

    def step(self):
        self.count += 1
        return self.count


class ByHand(cp.Node):
    def prep(self):
        self.frames, self.torn_down = 0, 0

    def step(self):
        self.frames += 1
        return self.frames

    def teardown(self):
        self.torn_down += 1


class AsyncByHand(ByHand):
    async def prep(self):
        ByHand.prep(self)

    async def teardown(self):
        ByHand.teardown(self)


@pytest.mark.parametrize("node_type", [ByHand, AsyncByHand])
@pytest.mark.parametrize("debug", ["step", None])
def test_a_node_run_by_hand_ends_with_shutdown_as_in_chimerapy(node_type, debug):
    node = node_type("camera", debug=debug)
    if debug is None:  # (with debug="step", the constructor ran prep, as ChimeraPy's did)
        if node_type is AsyncByHand:
            trio.run(node.prep)
        else:
            node.prep()
    assert [node.step() for _ in range(3)] == [1, 2, 3]
    node.shutdown()
    node.shutdown({})  # (ChimeraPy's message argument; once is enough)
    assert node.torn_down == 1 and node.running is False
    assert node.state is cp.NodeState.SHUTDOWN


def test_shutdown_by_hand_tells_a_main_loop_to_end():
    node = ByHand("camera", debug="step")
    node.running = True  # (as a main() run by hand sets it, and loops while it holds)
    node.shutdown()
    assert node.running is False and node.torn_down == 1


def test_a_node_in_a_cluster_is_not_shut_down_by_hand():
    from chimera._runtime import NodeRuntime

    node = ByHand("camera")
    NodeRuntime(node)
    with pytest.raises(RuntimeError, match="Manager's shutdown"):
        node.shutdown()


def test_a_subclass_travels_pickled_with_its_id_and_state():
    node = Counter("counter")
    node.prep()
    node.step()
    copy = pickle.loads(cloudpickle.dumps(node))
    assert (copy.name, copy.id, copy.count) == ("counter", node.id, 1)
    assert copy.step() == 2
    assert copy.logger is node.logger  # loggers travel by name


def test_a_graph_takes_nodes():
    source, sink = cp.Node("source"), cp.Node("sink")
    graph = cp.Graph()
    graph.add_edge(source, sink)
    assert graph.is_valid()
    assert graph.get_id_by_name("sink") == sink.id
    assert graph.followed_input(sink) == source.id
