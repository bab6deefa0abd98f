"""Spanning trees of the overlay for aggregation: build (maximum bandwidth) and repair.

Nodes are string ids. Undirected overlay edges come as `{(a, b): bandwidth}` in either
orientation; duplicates keep the larger bandwidth, self-loops and edges with an end outside
the given nodes are ignored.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from chaos_planner.errors import PlanningError

Edges = Mapping[tuple[str, str], float]


@dataclass(frozen=True)
class Tree:
    """A rooted tree: `parent[node]` is the node's parent, None for the root only."""

    root: str
    parent: Mapping[str, str | None]
    _children: Mapping[str, tuple[str, ...]] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        parent = MappingProxyType(dict(self.parent))
        children: dict[str, list[str]] = {node: [] for node in parent}
        for node, up in parent.items():
            if up is None:
                if node != self.root:
                    raise ValueError(f"only the root may lack a parent, not {node!r}")
            elif up not in parent:
                raise ValueError(f"parent {up!r} of {node!r} is not a node of the tree")
            else:
                children[up].append(node)
        if parent.get(self.root, "") is not None:
            raise ValueError(f"root {self.root!r} must be a node with parent None")
        object.__setattr__(self, "parent", parent)
        object.__setattr__(
            self, "_children", {node: tuple(sorted(kids)) for node, kids in children.items()}
        )
        if len(self.depth_first()) != len(parent):
            raise ValueError("parent links contain a cycle: not every node reaches the root")

    @property
    def nodes(self) -> frozenset[str]:
        """Every node of the tree."""
        return frozenset(self.parent)

    def children(self, node: str) -> tuple[str, ...]:
        """The node's children, sorted."""
        return self._children[node]

    def edges(self) -> frozenset[frozenset[str]]:
        """The tree's edges, each as the set of its two ends."""
        return frozenset(frozenset((n, up)) for n, up in self.parent.items() if up is not None)

    def depth_first(self) -> tuple[str, ...]:
        """Nodes in depth-first pre-order: the root first, children in sorted order."""
        order: list[str] = []
        stack = [self.root]
        while stack:
            node = stack.pop()
            order.append(node)
            stack.extend(reversed(self._children[node]))
        return tuple(order)

    def path_to_root(self, node: str) -> tuple[str, ...]:
        """`node`, its parent, its grandparent, ..., the root."""
        path = [node]
        while (up := self.parent[path[-1]]) is not None:
            path.append(up)
        return tuple(path)


def overlay_edges(nodes: Iterable[str], edges: Edges) -> dict[frozenset[str], float]:
    """The overlay among `nodes`: each undirected edge once, with its largest bandwidth."""
    members = set(nodes)
    merged: dict[frozenset[str], float] = {}
    for (a, b), bandwidth in edges.items():
        if a != b and a in members and b in members:
            key = frozenset((a, b))
            merged[key] = max(bandwidth, merged.get(key, bandwidth))
    return merged


class _UnionFind:
    def __init__(self, nodes: Iterable[str]) -> None:
        self._up = {node: node for node in nodes}

    def find(self, node: str) -> str:
        while self._up[node] != node:
            self._up[node] = self._up[self._up[node]]
            node = self._up[node]
        return node

    def union(self, a: str, b: str) -> bool:
        """Merge the sets of a and b; False if they were already one set."""
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return False
        self._up[max(ra, rb)] = min(ra, rb)
        return True


def connected_components(nodes: Iterable[str], edges: Edges) -> list[frozenset[str]]:
    """The connected components of the overlay, sorted by their smallest id."""
    members = set(nodes)
    sets = _UnionFind(members)
    for edge in overlay_edges(members, edges):
        sets.union(*edge)
    groups: dict[str, set[str]] = {}
    for node in members:
        groups.setdefault(sets.find(node), set()).add(node)
    return sorted((frozenset(group) for group in groups.values()), key=min)


def maximum_spanning_tree(nodes: Iterable[str], edges: Edges, root: str) -> Tree:
    """The maximum-bandwidth spanning tree of the overlay (Kruskal), rooted at `root`.

    Edges are tried by decreasing bandwidth, ties by their sorted end ids, so the tree is
    deterministic. PlanningError if `root` is not a node or the overlay is disconnected.
    """
    return _kruskal(set(nodes), edges, root, kept=())


def repair_tree(tree: Tree, nodes: Iterable[str], edges: Edges, root: str) -> Tree:
    """A spanning tree of the changed overlay that keeps every still-valid edge of `tree`.

    An old tree edge is kept when both its ends are still in `nodes` and it is still an
    overlay edge; the pieces are joined by maximum-bandwidth edges (Kruskal seeded with the
    kept edges). PlanningError if `root` is not a node or the overlay is disconnected.
    """
    members = set(nodes)
    overlay = overlay_edges(members, edges)
    kept = sorted(tuple(sorted(edge)) for edge in tree.edges() if edge in overlay)
    return _kruskal(members, edges, root, kept)


def _kruskal(members: set[str], edges: Edges, root: str, kept: Iterable[tuple[str, str]]) -> Tree:
    if root not in members:
        raise PlanningError(f"root: {root!r} is not one of the nodes")
    overlay = overlay_edges(members, edges)
    sets = _UnionFind(members)
    chosen = [edge for edge in kept if sets.union(*edge)]
    ranked = sorted(overlay.items(), key=lambda item: (-item[1], sorted(item[0])))
    chosen += [tuple(edge) for edge, _ in ranked if sets.union(*edge)]
    if len(chosen) != len(members) - 1:
        parts = connected_components(members, edges)
        raise PlanningError(
            f"edges: the overlay is disconnected ({len(parts)} components, "
            f"e.g. {sorted(parts[0])[:3]} and {sorted(parts[1])[:3]})"
        )
    return _rooted(members, chosen, root)


def _rooted(members: set[str], chosen: Iterable[Iterable[str]], root: str) -> Tree:
    neighbours: dict[str, list[str]] = {node: [] for node in members}
    for a, b in chosen:
        neighbours[a].append(b)
        neighbours[b].append(a)
    parent: dict[str, str | None] = {root: None}
    stack = [root]
    while stack:
        node = stack.pop()
        for other in neighbours[node]:
            if other not in parent:
                parent[other] = node
                stack.append(other)
    return Tree(root, parent)
