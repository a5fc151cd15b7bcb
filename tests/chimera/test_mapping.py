"""commit_graph's checks of the graph and the mapping: every bad input is named."""

from __future__ import annotations

import pickle
import traceback

import pytest

import chimera as cp
from chimera._mapping import resolve_mapping, resolve_placement

WORKERS = {"w1-id": "local", "w2-id": "remote"}


@pytest.fixture
def chain():
    a, b, c = cp.Node("a"), cp.Node("b"), cp.Node("c")
    graph = cp.Graph()
    graph.add_edges_from([(a, b), (b, c)])
    return graph, a, b, c


def test_workers_and_nodes_by_name_or_id(chain):
    graph, a, b, c = chain
    resolved = resolve_mapping(graph, WORKERS, {"local": ["a", b.id], "w2-id": ["c"]})
    assert resolved == {"w1-id": [a.id, b.id], "w2-id": [c.id]}


@pytest.mark.parametrize(
    ("mapping", "problem"),
    [
        ({"nobody": ["a", "b", "c"]}, "no worker 'nobody'"),
        ({"local": ["a", "b", "c", "z"]}, "no node 'z' in the graph"),
        ({"local": ["a", "b"], "remote": ["b", "c"]}, "node 'b' is mapped twice"),
        ({"local": ["a", "b"]}, "nodes not mapped to any worker: 'c'"),
        ({"local": "abc"}, "not a list of nodes"),
        ({"local": 5, "remote": ["a", "b", "c"]}, "worker 'local' is mapped to 5, not a list"),
        ({"local": ["a", "b", 3]}, "not int"),
    ],
)
def test_every_bad_mapping_is_named(chain, mapping, problem):
    graph = chain[0]
    with pytest.raises(cp.CommitGraphError, match=problem) as caught:
        resolve_mapping(graph, WORKERS, mapping)
    assert any(problem in text for text in caught.value.problems)


def test_an_invalid_graph_is_refused_with_its_problems(chain):
    graph, a, _, c = chain
    graph.add_edge(c, a)
    with pytest.raises(cp.CommitGraphError, match="cycle: a -> b -> c -> a") as caught:
        resolve_mapping(graph, WORKERS, {"local": ["a", "b", "c"]})
    # Printed as it is imported.
    (printed,) = traceback.format_exception_only(caught.value)
    assert printed.startswith("chimera.CommitGraphError: cannot commit the graph: ")


def test_two_nodes_of_one_name_are_one_problem(chain):
    graph = chain[0]
    graph.add_node(cp.Node("a"))
    with pytest.raises(cp.CommitGraphError) as caught:
        resolve_mapping(graph, WORKERS, {"local": ["a", "b", "c"]})
    assert caught.value.problems == ["two nodes named 'a'"]
    with pytest.raises(TypeError, match="must be a dict"):
        resolve_mapping(graph, WORKERS, ["local"])


def test_a_node_placed_by_a_name_two_nodes_share_is_refused(chain):
    # (A graph added to since it was checked: resolve_mapping said it before.)
    graph, a, *_ = chain
    mapping = resolve_mapping(graph, WORKERS, {"local": ["a", "b", "c"]})
    graph.add_node(cp.Node("a"))
    with pytest.raises(cp.CommitGraphError) as caught:
        resolve_placement(graph, WORKERS, mapping, "local", "a")
    assert caught.value.problems == ["two nodes named 'a'"]
    assert resolve_placement(graph, WORKERS, mapping, "local", a.id) == ("w1-id", a.id)


def test_a_node_placed_on_another_worker_than_its_mapping_says_is_refused(chain):
    graph, a, *_ = chain
    mapping = resolve_mapping(graph, WORKERS, {"local": ["a", "b"], "remote": ["c"]})
    with pytest.raises(cp.CommitGraphError) as caught:
        resolve_placement(graph, WORKERS, mapping, "remote", "a")
    assert caught.value.problems == ["node 'a' is not mapped to worker 'remote'"]
    assert resolve_placement(graph, WORKERS, mapping, "w1-id", "a") == ("w1-id", a.id)


def test_more_workers_than_allowed_is_refused(chain):
    graph = chain[0]
    with pytest.raises(cp.CommitGraphError, match="more than max_num_of_workers=1"):
        resolve_mapping(graph, WORKERS, {"local": ["a"], "remote": ["b", "c"]}, max_workers=1)
    # As many as allowed is fine.
    assert resolve_mapping(graph, WORKERS, {"local": ["a"], "remote": ["b", "c"]}, max_workers=2)


def test_two_workers_with_one_name_must_be_mapped_by_id(chain):
    graph = chain[0]
    twins = {"x": "lab", "y": "lab"}
    with pytest.raises(cp.CommitGraphError, match="2 workers are named 'lab'"):
        resolve_mapping(graph, twins, {"lab": ["a", "b", "c"]})
    assert resolve_mapping(graph, twins, {"x": ["a", "b", "c"]})["x"]


def test_every_problem_is_reported_at_once(chain):
    graph = chain[0]
    with pytest.raises(cp.CommitGraphError) as caught:
        resolve_mapping(graph, WORKERS, {"nobody": ["a"], "local": ["z"]})
    # no worker 'nobody', no node 'z', and so b and c are left unmapped
    assert caught.value.problems[2] == "nodes not mapped to any worker: 'b', 'c'"
    assert len(caught.value.problems) == 3
    copy = pickle.loads(pickle.dumps(caught.value))
    assert copy.problems == caught.value.problems and str(copy) == str(caught.value)


def test_nodes_mapped_to_a_worker_that_does_not_exist_are_not_also_unmapped(chain):
    graph = chain[0]
    with pytest.raises(cp.CommitGraphError) as caught:
        resolve_mapping(graph, WORKERS, {"nobody": ["a", "b", "c"]})
    assert caught.value.problems == ["no worker 'nobody' (connected: ['local', 'remote'])"]


def test_nodes_given_as_objects_are_named_and_not_also_unmapped(chain):
    graph, a, *_ = chain
    with pytest.raises(cp.CommitGraphError) as caught:
        resolve_mapping(graph, WORKERS, {"local": [a, "b", "c"]})
    assert caught.value.problems == [
        "a node is given by its id or name, not Node (use its name: 'a')"
    ]
