"""The pipeline: :class:`Graph`, a DAG of nodes and the links between them.

The graph is a :class:`networkx.DiGraph` keyed by node id. Each graph node
carries the user's node object (attribute ``object``) and its name (attribute
``name``); each edge carries ``follow`` (this input makes the receiving node
step) and ``delivery`` (``"reliable"`` or ``"latest"``, as in
:class:`transports.Delivery`).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Literal, Protocol

import networkx as nx

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from ._node import Node

#: The values of an edge's ``delivery``, the first one being the default.
_DELIVERIES = ("reliable", "latest")

_EDGE_OPTIONS = ("follow", "delivery")


class _NodeLike(Protocol):
    """What the graph needs of a node: a unique string ``id`` and a string ``name``."""

    @property
    def id(self) -> str: ...

    @property
    def name(self) -> str: ...


def _check_node(node: object) -> None:
    """Raise TypeError unless *node* has a str ``id`` and a str ``name``."""
    wrong = []
    for attribute in ("id", "name"):
        if not hasattr(node, attribute):
            wrong.append(f"no {attribute!r} attribute")
        elif not isinstance(getattr(node, attribute), str):
            kind = type(getattr(node, attribute)).__name__
            wrong.append(f"an {attribute!r} of type {kind}")
    if wrong:
        # (A chimera.Node whose __init__ did not call Node's has neither.)
        a_node = any(cls.__module__ == "chimera._node" for cls in type(node).__mro__)
        hint = " (its __init__ must call super().__init__(name))" if a_node else ""
        raise TypeError(
            f"a node needs a str 'id' and a str 'name'; "
            f"this {type(node).__name__} has {' and '.join(wrong)}{hint}"
        )


def _check_follow(follow: object) -> None:
    """Raise TypeError unless *follow* is True or False."""
    if not isinstance(follow, bool):
        raise TypeError(f"follow must be True or False, not {follow!r}")


def _check_delivery(delivery: object) -> None:
    """Raise ValueError unless *delivery* is one of :data:`_DELIVERIES`."""
    if not isinstance(delivery, str) or delivery not in _DELIVERIES:
        allowed = ", ".join(repr(d) for d in _DELIVERIES)
        raise ValueError(f"delivery must be one of {allowed}, not {delivery!r}")


def _how_many(count: int) -> str:
    return "two" if count == 2 else str(count)


class Graph:
    """A data pipeline: nodes, and the edges that carry chunks from one node to another.

    *g*, if given, is wrapped as it is (not copied), and must be keyed by node
    id with the attributes this class writes: ``object`` and ``name`` on every
    node. Without it the graph starts empty. The wrapped graph is :attr:`G`.

    A graph under construction may be invalid (see :meth:`problems`); the
    Manager refuses to run one that is.

    Raises:
        TypeError: *g* is not a :class:`networkx.DiGraph`, or is a multigraph.
        ValueError: a node of *g* lacks the ``object`` or ``name`` attribute, or
            its ``object`` has another id; an edge of *g* has an unknown ``delivery``.
    """

    def __init__(self, g: nx.DiGraph | None = None) -> None:
        if g is None:
            g = nx.DiGraph()
        elif not isinstance(g, nx.DiGraph) or g.is_multigraph():
            raise TypeError(f"g must be a networkx.DiGraph, not {type(g).__name__}")
        else:
            for node_id, data in g.nodes(data=True):
                node = data.get("object")
                if node is None or "name" not in data:
                    raise ValueError(
                        f"node {node_id!r} of g lacks the 'object' or 'name' attribute"
                    )
                _check_node(node)
                if node.id != node_id:
                    raise ValueError(f"node {node_id!r} of g holds a node with id {node.id!r}")
            for _, _, delivery in g.edges(data="delivery", default=_DELIVERIES[0]):
                _check_delivery(delivery)
        #: The wrapped :class:`networkx.DiGraph`, keyed by node id.
        self.G: nx.DiGraph = g

    # -- building -------------------------------------------------------------

    def add_node(self, node: _NodeLike) -> None:
        """Add *node*. Adding a node that is already in the graph does nothing.

        Raises:
            TypeError: *node* has no str ``id`` or no str ``name``.
            ValueError: another node object with the same id is in the graph.
        """
        self._check_new_node(node)
        if node.id not in self.G:
            self.G.add_node(node.id, object=node, name=node.name)

    def add_nodes_from(self, nodes: Iterable[_NodeLike]) -> None:
        """Add each of *nodes*, in order. If one is refused, none is added.

        Raises:
            TypeError: a node has no str ``id`` or no str ``name``.
            ValueError: another node object with the same id is in the graph,
                or two of *nodes* are different objects with the same id.
        """
        nodes = list(nodes)
        self._check_new_nodes(nodes)
        for node in nodes:
            self.add_node(node)

    def add_edge(
        self,
        src: _NodeLike,
        dst: _NodeLike,
        follow: bool = False,
        delivery: Literal["reliable", "latest"] = "reliable",
    ) -> None:
        """Send the chunks of *src* to *dst*, adding either node if needed.

        *follow* marks this edge as the input that makes *dst* step (see
        :meth:`followed_input`). *delivery* is how *dst* receives the chunks:
        ``"reliable"`` (lossless; a slow *dst* slows *src* down) or ``"latest"``
        (real time: *dst* gets the newest chunks, older ones are dropped).

        Adding an edge that exists replaces its ``follow`` and ``delivery``.
        If the call raises, the graph is unchanged.

        Raises:
            TypeError: *src* or *dst* has no str ``id`` or no str ``name``;
                *follow* is not a bool.
            ValueError: *delivery* is not ``"reliable"`` or ``"latest"``; another
                node object with the id of *src* or *dst* is in the graph.
        """
        self._check_new_nodes([src, dst])
        _check_follow(follow)
        _check_delivery(delivery)
        self.add_node(src)
        self.add_node(dst)
        self.G.add_edge(src.id, dst.id, follow=follow, delivery=delivery)

    def add_edges_from(
        self,
        list_of_edges: Iterable[Sequence[Any]],
    ) -> None:
        """Add each edge of *list_of_edges*, in order, as :meth:`add_edge` does.

        An item is ``(src, dst)``, or ``(src, dst, options)`` where *options* is
        a mapping with the keys ``"follow"`` and/or ``"delivery"``. If one item
        is refused, no edge is added.

        Raises:
            TypeError: an item is not a sequence; an option is unknown; a node
                has no str ``id`` or no str ``name``; a ``follow`` is not a bool.
            ValueError: an item does not have 2 or 3 elements; a ``delivery``
                is not ``"reliable"`` or ``"latest"``; another node object with
                the id of a node is in the graph.
        """
        edges = []
        for item in list_of_edges:
            if not isinstance(item, Sequence) or isinstance(item, str):
                raise TypeError(
                    f"an edge is (src, dst) or (src, dst, options), not {type(item).__name__}"
                )
            if len(item) == 2:
                src, dst = item
                options: Mapping[str, Any] = {}
            elif len(item) == 3:
                src, dst, options = item
                if not isinstance(options, Mapping):
                    raise TypeError(
                        f"the options of an edge are a mapping, not {type(options).__name__}"
                    )
                unknown = [key for key in options if key not in _EDGE_OPTIONS]
                if unknown:
                    allowed = ", ".join(repr(o) for o in _EDGE_OPTIONS)
                    raise TypeError(
                        f"unknown edge option {unknown[0]!r}; the options are {allowed}"
                    )
            else:
                raise ValueError(
                    f"an edge is (src, dst) or (src, dst, options), not {len(item)} items"
                )
            _check_follow(options.get("follow", False))
            _check_delivery(options.get("delivery", _DELIVERIES[0]))
            edges.append((src, dst, options))
        self._check_new_nodes([node for src, dst, _ in edges for node in (src, dst)])
        for src, dst, options in edges:
            self.add_edge(src, dst, **options)

    def _check_new_node(self, node: Any) -> None:
        """Raise unless *node* is a node that :meth:`add_node` accepts."""
        _check_node(node)
        if node.id in self.G and self.G.nodes[node.id]["object"] is not node:
            raise ValueError(
                f"another node with id {node.id!r} is already in the graph "
                f"(named {self._name(node.id)!r})"
            )

    def _check_new_nodes(self, nodes: Sequence[Any]) -> None:
        """Raise unless :meth:`add_node` accepts each of *nodes*, together."""
        seen: dict[str, object] = {}
        for node in nodes:
            self._check_new_node(node)
            if seen.setdefault(node.id, node) is not node:
                raise ValueError(f"two different nodes have the id {node.id!r}")

    # -- looking up -----------------------------------------------------------

    @property
    def nodes(self) -> list[Node]:
        """The node objects, in the order they were added."""
        return [node for _, node in self.G.nodes(data="object")]

    def get_id_by_name(self, node_name: str) -> str:
        """The id of the node named *node_name*.

        Raises:
            KeyError: no node is named *node_name*.
            ValueError: several nodes are named *node_name*.
        """
        found = [node_id for node_id, name in self.G.nodes(data="name") if name == node_name]
        if not found:
            raise KeyError(f"no node named {node_name!r}")
        if len(found) > 1:
            raise ValueError(f"{_how_many(len(found))} nodes named {node_name!r}")
        return found[0]

    def has_node_by_id(self, node_id: str) -> bool:
        """Whether a node with the id *node_id* is in the graph."""
        return node_id in self.G

    def inputs(self, node: _NodeLike | str) -> list[str]:
        """The ids of the nodes that send to *node* (a node or an id), in the order
        their edges were added.

        Raises:
            KeyError: *node* is not in the graph.
        """
        return list(self.G.predecessors(self._id(node)))

    def outputs(self, node: _NodeLike | str) -> list[str]:
        """The ids of the nodes that *node* (a node or an id) sends to, in the
        order their edges were added.

        Raises:
            KeyError: *node* is not in the graph.
        """
        return list(self.G.successors(self._id(node)))

    def followed_input(self, node: _NodeLike | str) -> str | None:
        """The id of the input whose chunks make *node* (a node or an id) step.

        That is the input whose edge was added with ``follow=True``; if there is
        none, the first input added; ``None`` for a source (a node without inputs).

        Raises:
            KeyError: *node* is not in the graph.
            ValueError: *node* follows more than one input (see :meth:`problems`).
        """
        node_id = self._id(node)
        inputs = self.inputs(node_id)
        followed = [src for src in inputs if self.G.edges[src, node_id].get("follow", False)]
        if len(followed) > 1:
            raise ValueError(self._follows_many(node_id, followed))
        if followed:
            return followed[0]
        return inputs[0] if inputs else None

    def edge_delivery(self, src: _NodeLike | str, dst: _NodeLike | str) -> str:
        """The delivery of the edge from *src* to *dst* (nodes or ids):
        ``"reliable"`` or ``"latest"``.

        Raises:
            KeyError: *src* or *dst* is not in the graph, or there is no edge
                from *src* to *dst*.
        """
        src_id, dst_id = self._id(src), self._id(dst)
        if not self.G.has_edge(src_id, dst_id):
            raise KeyError(f"no edge from {self._name(src_id)!r} to {self._name(dst_id)!r}")
        return self.G.edges[src_id, dst_id].get("delivery", _DELIVERIES[0])

    def _id(self, node: _NodeLike | str) -> str:
        """The id of *node*, a node or an id. Raises KeyError if it is not in the graph."""
        if isinstance(node, str):
            if node not in self.G:
                raise KeyError(f"no node with id {node!r}")
            return node
        node_id = getattr(node, "id", None)
        if not isinstance(node_id, str) or node_id not in self.G:
            raise KeyError(f"node {getattr(node, 'name', node)!r} is not in the graph")
        return node_id

    def _name(self, node_id: str) -> str:
        return self.G.nodes[node_id]["name"]

    # -- validating -----------------------------------------------------------

    def problems(self) -> list[str]:
        """Why the graph cannot run, one sentence each; empty if it can.

        The problems are: a self-loop (``"self-loop on 'a'"``), a cycle
        (``"cycle: a -> b -> a"``, one per group of nodes that reach each
        other), two nodes with the same name (``"two nodes named 'cam'"``), and
        a node with more than one input marked ``follow=True``
        (``"node 'sink' follows two inputs: 'a', 'b'"``).
        """
        found = self._cycle_problems()
        names = Counter(name for _, name in self.G.nodes(data="name"))
        found += [
            f"{_how_many(count)} nodes named {name!r}" for name, count in names.items() if count > 1
        ]
        for node_id in self.G:
            followed = [src for src, _, follow in self.G.in_edges(node_id, data="follow") if follow]
            if len(followed) > 1:
                found.append(self._follows_many(node_id, followed))
        return found

    def is_valid(self) -> bool:
        """Whether the graph can run: a DAG whose nodes have distinct names and
        follow at most one input each. :meth:`problems` says why not.
        """
        return not self.problems()

    def _cycle_problems(self) -> list[str]:
        """The self-loops and cycles of the graph, as :meth:`problems` words them."""
        loops = list(nx.selfloop_edges(self.G))
        found = [f"self-loop on {self._name(node_id)!r}" for node_id, _ in loops]
        order = {node_id: index for index, node_id in enumerate(self.G)}
        loopless = nx.restricted_view(self.G, nodes=[], edges=loops)
        groups = [group for group in nx.strongly_connected_components(loopless) if len(group) > 1]
        for group in sorted(groups, key=lambda group: min(order[n] for n in group)):
            start = min(group, key=order.__getitem__)
            cycle = nx.find_cycle(loopless.subgraph(group), source=start)
            names = [self._name(src) for src, _ in cycle] + [self._name(cycle[0][0])]
            found.append("cycle: " + " -> ".join(names))
        return found

    def _follows_many(self, node_id: str, followed: list[str]) -> str:
        inputs = ", ".join(repr(self._name(src)) for src in followed)
        return f"node {self._name(node_id)!r} follows {_how_many(len(followed))} inputs: {inputs}"

    # -- drawing --------------------------------------------------------------

    def get_layers_and_pos(self) -> tuple[list[list[str]], dict[str, tuple[float, float]]]:
        """The node ids by layer, and a position per node id to draw the graph.

        Layer 0 holds the sources; every other node is one layer after its
        farthest input, so every edge goes from a layer to a later one. Within
        a layer, nodes are in the order they were added. A node's position is
        ``(layer index, y)``, the ``y`` of a layer's nodes spread one apart,
        from top to bottom, centred on 0.

        Raises:
            ValueError: the graph has a cycle or a self-loop.
        """
        cycles = self._cycle_problems()
        if cycles:
            raise ValueError("the graph is not a DAG: " + "; ".join(cycles))
        order = {node_id: index for index, node_id in enumerate(self.G)}
        layers = [
            sorted(layer, key=order.__getitem__) for layer in nx.topological_generations(self.G)
        ]
        pos: dict[str, tuple[float, float]] = {}
        for x, layer in enumerate(layers):
            top = (len(layer) - 1) / 2
            for index, node_id in enumerate(layer):
                pos[node_id] = (float(x), top - index)
        return layers, pos

    def plot(self, font_size: int = 30, node_size: int = 5000) -> Figure:
        """Draw the graph with matplotlib, labelling each node with its name.

        Sources are on the left, data flows to the right (see
        :meth:`get_layers_and_pos`). Returns the new matplotlib figure, made
        with pyplot: show it with ``matplotlib.pyplot.show()``, or save it with
        ``fig.savefig(...)``.

        Raises:
            ImportError: matplotlib is not installed (``pip install matplotlib``,
                or the ``plot`` extra: ``pip install '.[plot]'`` in chimera's clone).
            ValueError: the graph has a cycle or a self-loop.
        """
        try:
            import matplotlib.pyplot as plt
        except ImportError as exc:
            raise ImportError(
                "Graph.plot needs matplotlib: pip install matplotlib (or, in chimera's "
                "clone, pip install '.[plot]')"
            ) from exc
        _, pos = self.get_layers_and_pos()
        fig, ax = plt.subplots()
        nx.draw_networkx(
            self.G,
            pos=pos,
            ax=ax,
            labels=dict(self.G.nodes(data="name")),
            font_size=font_size,
            node_size=node_size,
        )
        ax.set_axis_off()
        return fig

    # -- container protocol ---------------------------------------------------

    def __len__(self) -> int:
        return len(self.G)

    def __contains__(self, node: object) -> bool:
        """Whether *node*, a node or a node id, is in the graph (compared by id)."""
        node_id = node if isinstance(node, str) else getattr(node, "id", None)
        return isinstance(node_id, str) and node_id in self.G

    def __repr__(self) -> str:
        names = [name for _, name in self.G.nodes(data="name")]
        return f"<Graph {names!r}, {self.G.number_of_edges()} edges>"
