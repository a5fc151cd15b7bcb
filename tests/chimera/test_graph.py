import sys
import uuid

import networkx as nx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from chimera._graph import Graph


class FakeNode:
    def __init__(self, name):
        self.name = name
        self.id = uuid.uuid4().hex


def make(*names):
    return [FakeNode(name) for name in names]


def names(graph, ids):
    return [graph.G.nodes[node_id]["name"] for node_id in ids]


# -- building -----------------------------------------------------------------


def test_empty_graph():
    g = Graph()
    assert len(g) == 0
    assert g.nodes == []
    assert g.is_valid()
    assert g.problems() == []
    assert g.get_layers_and_pos() == ([], {})


def test_graphs_do_not_share_a_default_digraph():
    a, b = make("a", "b")
    first, second = Graph(), Graph()
    first.add_edge(a, b)
    assert len(second) == 0
    assert first.G is not second.G


def test_add_node_stores_object_and_name_by_id():
    (a,) = make("a")
    g = Graph()
    g.add_node(a)
    assert g.G.nodes[a.id] == {"object": a, "name": "a"}
    assert g.nodes == [a]
    assert len(g) == 1


def test_adding_the_same_node_twice_is_a_no_op():
    a, b = make("a", "b")
    g = Graph()
    g.add_node(a)
    g.add_edge(a, b)
    g.add_node(a)
    g.add_nodes_from([a, b])
    assert g.nodes == [a, b]
    assert g.outputs(a) == [b.id]


def test_add_nodes_from_keeps_order():
    nodes = make("c", "a", "b")
    g = Graph()
    g.add_nodes_from(nodes)
    assert g.nodes == nodes
    assert [node.name for node in g.nodes] == ["c", "a", "b"]


def test_another_object_with_the_same_id_is_refused():
    a, impostor = make("a", "impostor")
    impostor.id = a.id
    g = Graph()
    g.add_node(a)
    with pytest.raises(ValueError, match="already in the graph"):
        g.add_node(impostor)
    assert g.nodes == [a]


class NoId:
    name = "x"


class NoName:
    id = "abc"


class IntId:
    id = 3
    name = "x"


@pytest.mark.parametrize(
    ("thing", "missing"),
    [
        (NoId(), "no 'id' attribute"),
        (NoName(), "no 'name' attribute"),
        (IntId(), "an 'id' of type int"),
        ("a-string", "no 'id' attribute and no 'name' attribute"),
    ],
)
def test_a_non_node_is_a_type_error_naming_what_is_missing(thing, missing):
    g = Graph()
    with pytest.raises(TypeError, match=missing):
        g.add_node(thing)
    with pytest.raises(TypeError, match=missing):
        g.add_nodes_from([thing])
    with pytest.raises(TypeError, match=missing):
        g.add_edge(FakeNode("a"), thing)
    assert len(g) == 0


def test_a_node_whose_init_forgot_nodes_says_so():
    import chimera as cp

    class Camera(cp.Node):
        def __init__(self, name: str) -> None:
            self.device = 0  # (no super().__init__(name))

    with pytest.raises(TypeError) as caught:
        Graph().add_node(Camera("cam"))
    assert str(caught.value) == (
        "a node needs a str 'id' and a str 'name'; this Camera has no 'id' attribute and no "
        "'name' attribute (its __init__ must call super().__init__(name))"
    )


def test_add_nodes_from_adds_nothing_when_one_is_refused():
    a, b = make("a", "b")
    g = Graph()
    with pytest.raises(TypeError):
        g.add_nodes_from([a, NoId(), b])
    assert len(g) == 0


def test_add_nodes_from_adds_nothing_when_two_of_them_share_an_id():
    a, b, impostor = make("a", "b", "impostor")
    impostor.id = a.id
    g = Graph()
    with pytest.raises(ValueError, match=f"two different nodes have the id '{a.id}'"):
        g.add_nodes_from([a, b, impostor])
    assert len(g) == 0


def test_wrapping_an_existing_digraph():
    a, b = make("a", "b")
    digraph = nx.DiGraph()
    digraph.add_node(a.id, object=a, name="a")
    digraph.add_node(b.id, object=b, name="b")
    digraph.add_edge(a.id, b.id)
    g = Graph(digraph)
    assert g.G is digraph
    assert g.nodes == [a, b]
    assert g.edge_delivery(a, b) == "reliable"
    assert g.followed_input(b) == a.id


def test_wrapping_a_digraph_without_node_objects_is_refused():
    digraph = nx.DiGraph()
    digraph.add_node("abc")
    with pytest.raises(ValueError, match="'abc' of g lacks"):
        Graph(digraph)
    with pytest.raises(TypeError, match=r"networkx\.DiGraph"):
        Graph(nx.Graph())
    with pytest.raises(TypeError, match=r"networkx\.DiGraph, not MultiDiGraph"):
        Graph(nx.MultiDiGraph())


def test_wrapping_a_digraph_keyed_by_another_id_than_its_nodes_is_refused():
    (a,) = make("a")
    digraph = nx.DiGraph()
    digraph.add_node("x", object=a, name="a")
    with pytest.raises(ValueError, match=f"node 'x' of g holds a node with id '{a.id}'"):
        Graph(digraph)


# -- edges --------------------------------------------------------------------


def test_add_edge_adds_both_nodes():
    a, b = make("a", "b")
    g = Graph()
    g.add_edge(a, b)
    assert g.nodes == [a, b]
    assert g.outputs(a) == [b.id]
    assert g.inputs(b) == [a.id]
    assert g.inputs(a) == []
    assert g.outputs(b) == []


def test_delivery_defaults_to_reliable():
    a, b, c = make("a", "b", "c")
    g = Graph()
    g.add_edge(a, b)
    g.add_edge(b, c, delivery="latest")
    assert g.edge_delivery(a, b) == "reliable"
    assert g.edge_delivery(b.id, c.id) == "latest"


@pytest.mark.parametrize("delivery", ["fast", "RELIABLE", "", None, 1])
def test_unknown_delivery_is_a_value_error_listing_the_allowed_ones(delivery):
    a, b = make("a", "b")
    g = Graph()
    with pytest.raises(ValueError, match="'reliable', 'latest'") as info:
        g.add_edge(a, b, delivery=delivery)
    assert repr(delivery) in str(info.value)
    assert len(g) == 0  # a refused edge adds no node


@pytest.mark.parametrize("follow", ["no", None, 1])
def test_follow_that_is_not_a_bool_is_a_type_error(follow):
    a, b = make("a", "b")
    g = Graph()
    with pytest.raises(TypeError, match="follow must be True or False"):
        g.add_edge(a, b, follow=follow)
    with pytest.raises(TypeError, match="follow must be True or False"):
        g.add_edges_from([(a, b, {"follow": follow})])
    assert len(g) == 0


def test_edge_delivery_of_a_missing_edge_is_a_key_error():
    a, b = make("a", "b")
    g = Graph()
    g.add_edge(a, b)
    with pytest.raises(KeyError, match="no edge from 'b' to 'a'"):
        g.edge_delivery(b, a)
    with pytest.raises(KeyError, match="no node with id 'nope'"):
        g.edge_delivery(a, "nope")


def test_adding_an_edge_again_replaces_its_options():
    a, b = make("a", "b")
    g = Graph()
    g.add_edge(a, b)
    g.add_edge(a, b, delivery="latest", follow=True)
    assert g.G.number_of_edges() == 1
    assert g.edge_delivery(a, b) == "latest"
    assert g.G.edges[a.id, b.id]["follow"] is True


def test_add_edges_from_both_item_shapes():
    a, b, c, d = make("a", "b", "c", "d")
    g = Graph()
    g.add_edges_from(
        [
            (a, c),
            (b, c, {"follow": True, "delivery": "latest"}),
            [c, d],
            (a, d, {"delivery": "latest"}),
            (b, d, {}),
        ]
    )
    assert g.nodes == [a, c, b, d]
    assert g.inputs(c) == [a.id, b.id]
    assert g.followed_input(c) == b.id
    assert g.edge_delivery(a, c) == "reliable"
    assert g.edge_delivery(b, c) == "latest"
    assert g.edge_delivery(a, d) == "latest"
    assert g.edge_delivery(b, d) == "reliable"
    assert g.followed_input(d) == c.id
    assert g.is_valid()


@pytest.mark.parametrize(
    ("bad_item", "error", "message"),
    [
        ("ab", TypeError, "not str"),
        (("a-only",), ValueError, "not 1 items"),
        ((0, 1, {}, 3), ValueError, "not 4 items"),
        ((0, 1, {"colour": "red"}), TypeError, "unknown edge option 'colour'"),
        ((0, 1, {"delivery": "fast"}), ValueError, "delivery must be one of"),
        ((0, 1, {"follow": "yes"}), TypeError, "follow must be True or False"),
        ((0, 1, ["follow"]), TypeError, "options of an edge are a mapping"),
    ],
)
def test_add_edges_from_refuses_bad_items_and_adds_nothing(bad_item, error, message):
    a, b = make("a", "b")
    if isinstance(bad_item, tuple) and len(bad_item) > 1:
        bad_item = (a, b, *bad_item[2:])
    g = Graph()
    with pytest.raises(error, match=message):
        g.add_edges_from([(a, b), bad_item])
    assert len(g) == 0


def test_add_edges_from_adds_nothing_when_a_later_edge_brings_a_node_of_a_taken_id():
    a, b, c, impostor = make("a", "b", "c", "impostor")
    impostor.id = a.id
    g = Graph()
    with pytest.raises(ValueError, match=f"two different nodes have the id '{a.id}'"):
        g.add_edges_from([(a, b), (b, c), (c, impostor)])
    assert len(g) == 0
    g.add_node(a)
    with pytest.raises(ValueError, match="already in the graph"):
        g.add_edges_from([(b, c), (c, impostor)])
    assert g.nodes == [a]


def test_inputs_and_outputs_keep_insertion_order_and_accept_ids():
    src1, src2, src3, mid, out1, out2 = make("s1", "s2", "s3", "mid", "o1", "o2")
    g = Graph()
    g.add_edge(src2, mid)
    g.add_edge(mid, out2)
    g.add_edge(src3, mid)
    g.add_edge(src1, mid)
    g.add_edge(mid, out1)
    assert names(g, g.inputs(mid)) == ["s2", "s3", "s1"]
    assert names(g, g.outputs(mid)) == ["o2", "o1"]
    assert g.inputs(mid.id) == g.inputs(mid)
    assert g.outputs(mid.id) == g.outputs(mid)


def test_lookups_of_unknown_nodes_are_key_errors():
    a, stranger = make("a", "stranger")
    g = Graph()
    g.add_node(a)
    with pytest.raises(KeyError, match="'stranger' is not in the graph"):
        g.inputs(stranger)
    with pytest.raises(KeyError, match="no node with id 'xyz'"):
        g.outputs("xyz")
    with pytest.raises(KeyError):
        g.followed_input(stranger)


# -- follow -------------------------------------------------------------------


def test_a_source_follows_nothing():
    a, b = make("a", "b")
    g = Graph()
    g.add_edge(a, b)
    assert g.followed_input(a) is None


def test_follow_defaults_to_the_first_in_edge():
    a, b, sink = make("a", "b", "sink")
    g = Graph()
    g.add_edge(b, sink)
    g.add_edge(a, sink)
    assert g.followed_input(sink) == b.id
    assert g.followed_input(sink.id) == b.id


def test_explicit_follow_wins():
    a, b, c, sink = make("a", "b", "c", "sink")
    g = Graph()
    g.add_edge(a, sink)
    g.add_edge(b, sink, follow=True)
    g.add_edge(c, sink)
    assert g.followed_input(sink) == b.id
    assert g.is_valid()


def test_following_two_inputs_is_reported_and_ambiguous():
    a, b, sink = make("a", "b", "sink")
    g = Graph()
    g.add_edge(a, sink, follow=True)
    g.add_edge(b, sink, follow=True)
    assert not g.is_valid()
    assert g.problems() == ["node 'sink' follows two inputs: 'a', 'b'"]
    with pytest.raises(ValueError, match="node 'sink' follows two inputs"):
        g.followed_input(sink)


# -- names and ids ------------------------------------------------------------


def test_get_id_by_name_and_has_node_by_id():
    a, b = make("a", "b")
    g = Graph()
    g.add_edge(a, b)
    assert g.get_id_by_name("a") == a.id
    assert g.get_id_by_name("b") == b.id
    assert g.has_node_by_id(a.id)
    assert not g.has_node_by_id("a")
    assert not g.has_node_by_id(uuid.uuid4().hex)


def test_get_id_by_name_of_a_missing_name_is_a_key_error_naming_it():
    g = Graph()
    g.add_node(FakeNode("a"))
    with pytest.raises(KeyError, match="no node named 'ghost'"):
        g.get_id_by_name("ghost")


def test_get_id_by_name_refuses_an_ambiguous_name():
    g = Graph()
    g.add_nodes_from(make("cam", "cam"))
    with pytest.raises(ValueError, match="two nodes named 'cam'"):
        g.get_id_by_name("cam")


def test_contains_len_and_repr():
    a, b, outsider = make("a", "b", "outsider")
    g = Graph()
    g.add_edge(a, b)
    assert a in g
    assert b.id in g
    assert outsider not in g
    assert outsider.id not in g
    assert "a" not in g  # a name is not an id
    assert 42 not in g
    assert len(g) == 2
    assert repr(g) == "<Graph ['a', 'b'], 1 edges>"


# -- validity -----------------------------------------------------------------


def test_valid_chain_and_diamond():
    a, b, c, d = make("a", "b", "c", "d")
    chain = Graph()
    chain.add_edges_from([(a, b), (b, c)])
    assert chain.is_valid()
    diamond = Graph()
    diamond.add_edges_from([(a, b), (a, c), (b, d), (c, d, {"follow": True})])
    assert diamond.is_valid()
    assert diamond.problems() == []


def test_isolated_nodes_are_valid():
    g = Graph()
    g.add_nodes_from(make("a", "b", "c"))
    assert g.is_valid()


def test_a_cycle_is_invalid():
    a, b = make("a", "b")
    g = Graph()
    g.add_edge(a, b)
    g.add_edge(b, a)
    assert not g.is_valid()
    assert g.problems() == ["cycle: a -> b -> a"]


def test_a_long_cycle_names_every_node_on_it():
    a, b, c, d = make("a", "b", "c", "d")
    g = Graph()
    g.add_edges_from([(d, a), (a, b), (b, c), (c, a)])
    assert g.problems() == ["cycle: a -> b -> c -> a"]


def test_two_separate_cycles_are_both_reported():
    a, b, c, d = make("a", "b", "c", "d")
    g = Graph()
    g.add_edges_from([(a, b), (b, a), (c, d), (d, c)])
    assert g.problems() == ["cycle: a -> b -> a", "cycle: c -> d -> c"]


def test_cycles_are_reported_in_the_order_their_nodes_were_added():
    # (a's cycle leads into c's: a search from a finishes c's cycle first.)
    a, b, c, d = make("a", "b", "c", "d")
    g = Graph()
    g.add_edges_from([(a, b), (b, a), (a, c), (c, d), (d, c)])
    assert g.problems() == ["cycle: a -> b -> a", "cycle: c -> d -> c"]


def test_a_self_loop_is_invalid():
    a, b = make("a", "b")
    g = Graph()
    g.add_edge(a, b)
    g.add_edge(b, b)
    assert not g.is_valid()
    assert g.problems() == ["self-loop on 'b'"]


def test_duplicate_names_are_invalid():
    cam1, cam2, sink = make("cam", "cam", "sink")
    g = Graph()
    g.add_edge(cam1, sink)
    g.add_edge(cam2, sink)
    assert not g.is_valid()
    assert g.problems() == ["two nodes named 'cam'"]
    g.add_node(FakeNode("cam"))
    assert g.problems() == ["3 nodes named 'cam'"]


def test_every_problem_is_reported_at_once():
    a, b, c, sink = make("a", "b", "a", "sink")
    g = Graph()
    g.add_edges_from(
        [(a, b), (b, a), (c, c), (a, sink, {"follow": True}), (b, sink, {"follow": True})]
    )
    assert g.problems() == [
        "self-loop on 'a'",
        "cycle: a -> b -> a",
        "two nodes named 'a'",
        "node 'sink' follows two inputs: 'a', 'b'",
    ]
    assert not g.is_valid()


# -- layers -------------------------------------------------------------------


def test_layers_and_pos_of_a_diamond():
    a, b, c, d = make("a", "b", "c", "d")
    g = Graph()
    g.add_edges_from([(a, b), (a, c), (b, d), (c, d)])
    layers, pos = g.get_layers_and_pos()
    assert layers == [[a.id], [b.id, c.id], [d.id]]
    assert pos == {
        a.id: (0.0, 0.0),
        b.id: (1.0, 0.5),
        c.id: (1.0, -0.5),
        d.id: (2.0, 0.0),
    }


def test_a_node_goes_one_layer_after_its_farthest_input():
    a, b, c = make("a", "b", "c")
    g = Graph()
    g.add_edges_from([(a, c), (a, b), (b, c)])
    layers, _ = g.get_layers_and_pos()
    assert layers == [[a.id], [b.id], [c.id]]


def test_layers_within_a_layer_follow_insertion_order():
    nodes = make("z", "y", "x", "sink")
    g = Graph()
    for src in nodes[:3]:
        g.add_edge(src, nodes[3])
    layers, pos = g.get_layers_and_pos()
    assert layers == [[n.id for n in nodes[:3]], [nodes[3].id]]
    assert [pos[n.id] for n in nodes[:3]] == [(0.0, 1.0), (0.0, 0.0), (0.0, -1.0)]


def test_layer_order_is_the_order_nodes_were_added_not_the_order_they_were_reached():
    a, b, c, d = make("a", "b", "c", "d")
    g = Graph()
    g.add_nodes_from([a, b, c, d])
    g.add_edges_from([(a, d), (b, c)])
    layers, pos = g.get_layers_and_pos()
    assert layers == [[a.id, b.id], [c.id, d.id]]
    assert pos[c.id] == (1.0, 0.5)
    assert pos[d.id] == (1.0, -0.5)


def test_layers_of_a_cycle_is_a_value_error():
    a, b = make("a", "b")
    g = Graph()
    g.add_edge(a, b)
    g.add_edge(b, a)
    with pytest.raises(ValueError, match="not a DAG: cycle: a -> b -> a"):
        g.get_layers_and_pos()


def test_layers_of_a_self_loop_is_a_value_error():
    (a,) = make("a")
    g = Graph()
    g.add_edge(a, a)
    with pytest.raises(ValueError, match="self-loop on 'a'"):
        g.get_layers_and_pos()


@st.composite
def dags(draw):
    """A graph of up to 12 nodes, edges only from lower to higher index, at
    most one follow flag per node; and its nodes and edges (as index pairs)."""
    n = draw(st.integers(1, 12))
    pairs = [(i, j) for i in range(n) for j in range(i + 1, n)]
    edges = draw(st.lists(st.sampled_from(pairs), unique=True)) if pairs else []
    followed = {}
    for j in range(n):
        ins = [i for i, k in edges if k == j]
        if ins:
            pick = draw(st.one_of(st.none(), st.sampled_from(ins)))
            if pick is not None:
                followed[j] = pick
    nodes = [FakeNode(f"n{i}") for i in range(n)]
    g = Graph()
    g.add_nodes_from(draw(st.permutations(nodes)))
    for i, j in edges:
        g.add_edge(nodes[i], nodes[j], follow=followed.get(j) == i)
    return g, nodes, edges, followed


@settings(max_examples=200, deadline=None)
@given(dags(), st.data())
def test_random_dags_are_valid_and_layered(dag, data):
    g, nodes, edges, followed = dag
    assert g.is_valid()
    assert g.problems() == []

    layers, pos = g.get_layers_and_pos()
    flat = [node_id for layer in layers for node_id in layer]
    assert sorted(flat) == sorted(node.id for node in nodes)  # every node exactly once
    assert set(pos) == set(flat)
    layer_of = {node_id: index for index, layer in enumerate(layers) for node_id in layer}
    for i, j in edges:
        assert layer_of[nodes[i].id] < layer_of[nodes[j].id]
        assert pos[nodes[i].id][0] < pos[nodes[j].id][0]
    assert all(layer_of[n.id] == 0 for n in nodes if not g.inputs(n))

    for j, node in enumerate(nodes):
        first_in = [i for i, k in edges if k == j][:1]
        expected = followed.get(j, first_in[0] if first_in else None)
        assert g.followed_input(node) == (None if expected is None else nodes[expected].id)

    # A back edge, from a node to one of its ancestors, closes a cycle.
    reachable = [
        (i, j)
        for i, a in enumerate(nodes)
        for j, b in enumerate(nodes)
        if i < j and nx.has_path(g.G, a.id, b.id)
    ]
    if reachable:
        i, j = data.draw(st.sampled_from(reachable))
        g.add_edge(nodes[j], nodes[i])
        assert not g.is_valid()
        assert any(problem.startswith("cycle: ") for problem in g.problems())
        with pytest.raises(ValueError, match="not a DAG"):
            g.get_layers_and_pos()


# -- plot ---------------------------------------------------------------------


def test_plot_returns_a_figure_with_one_label_per_node():
    matplotlib = pytest.importorskip("matplotlib")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.figure import Figure

    a, b, c, d = make("cam", "mic", "fuse", "save")
    g = Graph()
    g.add_edges_from([(a, c), (b, c), (c, d)])
    fig = g.plot(font_size=12, node_size=300)
    try:
        assert isinstance(fig, Figure)
        (ax,) = fig.axes
        labels = sorted(text.get_text() for text in ax.texts)
        assert labels == ["cam", "fuse", "mic", "save"]
        assert all(text.get_fontsize() == 12 for text in ax.texts)
    finally:
        plt.close(fig)


def test_plot_of_a_cycle_is_a_value_error():
    pytest.importorskip("matplotlib")
    a, b = make("a", "b")
    g = Graph()
    g.add_edges_from([(a, b), (b, a)])
    with pytest.raises(ValueError, match="not a DAG"):
        g.plot()


def test_plot_without_matplotlib_says_how_to_install_it(monkeypatch):
    # (chimera is not on PyPI: the extra installs from the clone.)
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.pyplot", None)
    g = Graph()
    g.add_node(FakeNode("a"))
    with pytest.raises(ImportError) as info:
        g.plot()
    assert str(info.value) == (
        "Graph.plot needs matplotlib: pip install matplotlib "
        "(or, in chimera's clone, pip install '.[plot]')"
    )
