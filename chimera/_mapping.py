"""Checking what ``commit_graph`` is given: the graph, and which Worker runs which node."""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence

from ._errors import CommitGraphError
from ._graph import Graph

__all__ = ["resolve_mapping", "resolve_placement"]


def resolve_mapping(
    graph: Graph,
    workers: Mapping[str, str],
    mapping: Mapping[str, Sequence[str]],
    max_workers: int | None = None,
) -> dict[str, list[str]]:
    """The mapping as ``{worker id: [node id, ...]}``, checked against *graph* and *workers*.

    Args:
        graph: the graph to run.
        workers: the connected Workers, ``{id: name}``.
        mapping: ``{worker: [node, ...]}``; a worker is given by id or name,
            a node by id or name (ChimeraPy scripts use names).
        max_workers: the most Workers the cluster may use (None: no limit).

    Raises:
        TypeError: *mapping* is not a mapping.
        CommitGraphError: naming every problem found: the graph is not valid
            (see :meth:`chimera.Graph.problems`); a worker or a node of the
            mapping does not exist, or is named ambiguously; a node is mapped
            twice, or not at all; the mapping uses more than *max_workers*
            Workers.
    """
    if not isinstance(mapping, Mapping):
        raise TypeError(
            f"the mapping must be a dict of {{worker: [node, ...]}}, not {type(mapping).__name__}"
        )
    problems = list(graph.problems())
    by_name = _by_name(workers)
    resolved: dict[str, list[str]] = {}
    placed: dict[str, str] = {}
    #: The nodes the mapping names (to a worker that exists or not).
    named: set[str] = set()
    for worker, nodes in mapping.items():
        worker_id = _worker_id(worker, workers, by_name, problems)
        if isinstance(nodes, str) or not isinstance(nodes, Sequence):
            problems.append(f"worker {worker!r} is mapped to {nodes!r}, not a list of nodes")
            continue
        for node in nodes:
            node_id = _node_id(graph, node, problems)
            if node_id is not None:
                named.add(node_id)
            if node_id is None or worker_id is None:
                continue
            if node_id in placed:
                problems.append(
                    f"node {graph.G.nodes[node_id]['name']!r} is mapped twice "
                    f"(to {workers[placed[node_id]]!r} and {workers[worker_id]!r})"
                )
                continue
            placed[node_id] = worker_id
            resolved.setdefault(worker_id, []).append(node_id)
    # (Nodes that share a name are a problem of the graph already, said above.)
    shared = {
        name
        for name, count in Counter(graph.G.nodes[n]["name"] for n in graph.G).items()
        if count > 1
    }
    unmapped = [
        name
        for node_id, name in graph.G.nodes(data="name")
        if node_id not in placed and node_id not in named and name not in shared
    ]
    if unmapped:
        problems.append(f"nodes not mapped to any worker: {', '.join(map(repr, unmapped))}")
    if max_workers is not None and len(resolved) > max_workers:
        problems.append(
            f"the mapping uses {len(resolved)} workers, more than max_num_of_workers={max_workers}"
        )
    if problems:
        raise CommitGraphError(problems)
    return resolved


def resolve_placement(
    graph: Graph,
    workers: Mapping[str, str],
    mapping: Mapping[str, list[str]],
    worker: str,
    node: str,
) -> tuple[str, str]:
    """The ids of *worker* and *node* (each an id or a name), checked against
    a resolved *mapping* (see :func:`resolve_mapping`).

    Raises:
        CommitGraphError: no such worker or node, or the node is not mapped to
            the worker, or two nodes have its name (the graph changed since
            it was checked).
    """
    problems: list[str] = []
    worker_id = _worker_id(worker, workers, _by_name(workers), problems)
    node_id = _node_id(graph, node, problems)
    if worker_id is not None and node_id is not None and node_id not in mapping.get(worker_id, []):
        problems.append(f"node {node!r} is not mapped to worker {worker!r}")
    if problems:
        raise CommitGraphError(problems)
    if worker_id is None or node_id is None:  # (a name two nodes share: said by the graph)
        raise CommitGraphError(graph.problems())
    return worker_id, node_id


def _by_name(workers: Mapping[str, str]) -> dict[str, list[str]]:
    """The ids of *workers* (``{id: name}``) by name."""
    by_name: dict[str, list[str]] = {}
    for worker_id, name in workers.items():
        by_name.setdefault(name, []).append(worker_id)
    return by_name


def _worker_id(
    worker: str,
    workers: Mapping[str, str],
    by_name: Mapping[str, list[str]],
    problems: list[str],
) -> str | None:
    if worker in workers:
        return worker
    found = by_name.get(worker, [])
    if len(found) == 1:
        return found[0]
    if found:
        problems.append(f"{len(found)} workers are named {worker!r}: map them by id")
    else:
        problems.append(f"no worker {worker!r} (connected: {sorted(workers.values())})")
    return None


def _node_id(graph: Graph, node: str, problems: list[str]) -> str | None:
    if not isinstance(node, str):
        name = getattr(node, "name", None)
        hint = f" (use its name: {name!r})" if isinstance(name, str) else ""
        problems.append(f"a node is given by its id or name, not {type(node).__name__}{hint}")
        # (A node of the graph, given as itself: named, so not said to be unmapped too.)
        node_id = getattr(node, "id", None)
        return node_id if isinstance(node_id, str) and graph.has_node_by_id(node_id) else None
    if graph.has_node_by_id(node):
        return node
    try:
        return graph.get_id_by_name(node)
    except KeyError:
        problems.append(f"no node {node!r} in the graph")
    except ValueError:  # two nodes with that name: already a problem of the graph
        pass
    return None
