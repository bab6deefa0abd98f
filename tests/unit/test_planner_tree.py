"""Aggregation trees: maximum-bandwidth spanning trees and their repair, against brute force."""

from __future__ import annotations

import itertools

import pytest
from chaos_planner import (
    PlanningError,
    Tree,
    connected_components,
    maximum_spanning_tree,
    repair_tree,
)
from chaos_planner.tree import overlay_edges
from hypothesis import assume, given, settings
from hypothesis import strategies as st

pytestmark = pytest.mark.unit

NODES = [f"n{i}" for i in range(6)]


@st.composite
def graphs(draw: st.DrawFn, min_nodes: int = 1, max_nodes: int = 6):
    """(nodes, edges) with few distinct bandwidths (ties), random orientation, duplicates."""
    nodes = draw(st.sets(st.sampled_from(NODES), min_size=min_nodes, max_size=max_nodes))
    pairs = list(itertools.combinations(sorted(nodes), 2))
    chosen = draw(st.lists(st.sampled_from(pairs), max_size=12)) if pairs else []
    edges = {}
    for a, b in chosen:
        key = (b, a) if draw(st.booleans()) else (a, b)
        edges[key] = float(draw(st.sampled_from([1, 2, 3, 5, 8])))
    return nodes, edges


def spanning(nodes: set[str], edges: dict) -> bool:
    return len(connected_components(nodes, edges)) == 1


def weight(tree: Tree, overlay: dict) -> float:
    return sum(overlay[edge] for edge in tree.edges())


def brute_force_best(nodes: set[str], overlay: dict, forced: frozenset = frozenset()) -> float:
    """The largest total bandwidth of a spanning tree containing `forced` (by enumeration)."""
    best = None
    for subset in itertools.combinations(overlay, len(nodes) - 1):
        if not forced <= set(subset):
            continue
        if spanning(nodes, {tuple(edge): 1.0 for edge in subset}):
            total = sum(overlay[edge] for edge in subset)
            best = total if best is None else max(best, total)
    assert best is not None
    return best


def assert_spanning_tree_of(tree: Tree, nodes: set[str], overlay: dict, root: str) -> None:
    assert tree.root == root and tree.parent[root] is None
    assert tree.nodes == frozenset(nodes)
    assert len(tree.edges()) == len(nodes) - 1
    assert tree.edges() <= set(overlay)
    assert set(tree.depth_first()) == set(nodes)
    for node in nodes:
        assert tree.path_to_root(node)[-1] == root


@settings(max_examples=200, deadline=None)
@given(graphs(), st.data())
def test_maximum_spanning_tree_is_a_maximum_spanning_tree(graph, data) -> None:
    nodes, edges = graph
    root = data.draw(st.sampled_from(sorted(nodes)))
    overlay = overlay_edges(nodes, edges)
    if not spanning(nodes, edges):
        with pytest.raises(PlanningError, match=r"^edges: the overlay is disconnected"):
            maximum_spanning_tree(nodes, edges, root)
        return
    tree = maximum_spanning_tree(nodes, edges, root)
    assert_spanning_tree_of(tree, nodes, overlay, root)
    if len(nodes) > 1:
        assert weight(tree, overlay) == brute_force_best(nodes, overlay)
    flipped = {(b, a): bandwidth for (a, b), bandwidth in reversed(edges.items())}
    assert maximum_spanning_tree(nodes, flipped, root) == tree  # deterministic


@settings(max_examples=200, deadline=None)
@given(graphs(min_nodes=2), graphs(), st.data())
def test_repair_keeps_valid_edges_and_completes_with_the_best(old_graph, change, data) -> None:
    old_nodes, old_edges = old_graph
    assume(spanning(old_nodes, old_edges))
    old = maximum_spanning_tree(old_nodes, old_edges, min(old_nodes))
    # The new overlay: some old nodes and edges survive, some nodes and edges are added.
    survivors = data.draw(st.sets(st.sampled_from(sorted(old_nodes))))
    nodes = survivors | change[0]
    kept_edges = data.draw(st.sets(st.sampled_from(sorted(old_edges))))
    edges = {key: old_edges[key] for key in kept_edges} | change[1]
    assume(nodes)
    root = data.draw(st.sampled_from(sorted(nodes)))
    overlay = overlay_edges(nodes, edges)
    if not spanning(nodes, edges):
        with pytest.raises(PlanningError, match=r"^edges: the overlay is disconnected"):
            repair_tree(old, nodes, edges, root)
        return
    tree = repair_tree(old, nodes, edges, root)
    assert_spanning_tree_of(tree, nodes, overlay, root)
    still_valid = frozenset(edge for edge in old.edges() if edge in overlay)
    assert still_valid <= tree.edges()
    if len(nodes) > 1:
        assert weight(tree, overlay) == brute_force_best(nodes, overlay, still_valid)


def test_repair_reattaches_orphans_of_a_leaver_and_keeps_the_rest() -> None:
    edges = {("a", "b"): 10, ("b", "c"): 10, ("b", "d"): 10, ("a", "c"): 1, ("c", "d"): 5}
    old = maximum_spanning_tree("abcd", edges, "a")
    assert old.edges() == {frozenset("ab"), frozenset("bc"), frozenset("bd")}
    repaired = repair_tree(old, "acd", edges, "a")  # b leaves
    assert repaired.edges() == {frozenset("ac"), frozenset("cd")}
    assert repaired.parent == {"a": None, "c": "a", "d": "c"}
    grown = repair_tree(old, "abcde", {**edges, ("e", "a"): 1, ("d", "e"): 3}, "a")
    assert old.edges() < grown.edges() and frozenset("de") in grown.edges()


def test_tree_accessors() -> None:
    tree = Tree("r", {"r": None, "b": "r", "a": "r", "c": "a"})
    assert tree.nodes == frozenset("rabc")
    assert tree.children("r") == ("a", "b")
    assert tree.children("c") == ()
    assert tree.depth_first() == ("r", "a", "c", "b")
    assert tree.path_to_root("c") == ("c", "a", "r")
    assert tree.path_to_root("r") == ("r",)
    assert tree.edges() == {frozenset("rb"), frozenset("ra"), frozenset("ac")}


@pytest.mark.parametrize(
    "parent",
    [
        {"r": None, "a": "b", "b": "a"},  # cycle away from the root
        {"r": None, "a": None},  # two roots
        {"r": "a", "a": None},  # the root has a parent
        {"r": None, "a": "x"},  # parent outside the tree
    ],
)
def test_invalid_trees_are_rejected(parent: dict) -> None:
    with pytest.raises(ValueError):
        Tree("r", parent)


def test_components_duplicates_and_errors() -> None:
    edges = {("b", "a"): 1.0, ("a", "b"): 7.0, ("c", "d"): 2.0, ("d", "x"): 9.0, ("e", "e"): 1}
    assert overlay_edges("abcde", edges) == {frozenset("ab"): 7.0, frozenset("cd"): 2.0}
    assert connected_components("edcba", edges) == [
        frozenset("ab"),
        frozenset("cd"),
        frozenset("e"),
    ]
    with pytest.raises(PlanningError, match=r"^edges: the overlay is disconnected"):
        maximum_spanning_tree("abcd", edges, "a")
    with pytest.raises(PlanningError, match=r"^root: 'z'"):
        maximum_spanning_tree("ab", edges, "z")
    assert maximum_spanning_tree(["solo"], {}, "solo").parent == {"solo": None}
