"""Membership views: the initial tree and the pure rules of `next_view`."""

from __future__ import annotations

import itertools

import pytest
from chaos_planner import Tree, connected_components
from chaos_worker.membership.view import (
    FIRST_STEP_SHARE,
    Change,
    View,
    full_mesh,
    initial_view,
    link_ends,
    link_key,
    next_view,
)
from hypothesis import given, settings
from hypothesis import strategies as st

pytestmark = pytest.mark.unit


def addresses(*ids: str) -> dict[str, str]:
    return {m: f"127.0.0.1:{7000 + i}" for i, m in enumerate(ids)}


def mesh_view(n: int, speeds: dict[str, float] | None = None) -> View:
    members = addresses(*(f"w{i}" for i in range(n)))
    view = initial_view(members, full_mesh(members))
    return view.model_copy(update={"speeds": speeds}) if speeds else view


def tree_edges(view: View) -> set[frozenset[str]]:
    return {frozenset((m, p)) for m, p in view.parent.items() if p is not None}


def live_links(view: View) -> set[frozenset[str]]:
    return {frozenset(edge) for edge in view.live_edges()}


def assert_spanning_tree(view: View) -> None:
    """`parent` is a spanning tree of `members`, rooted at `root`, over live links only."""
    tree = Tree(view.root, view.parent)  # rejects cycles, several roots, unknown parents
    assert tree.nodes == frozenset(view.members)
    assert view.parent[view.root] is None
    assert len(tree_edges(view)) == len(view.members) - 1
    assert tree_edges(view) <= live_links(view)
    assert set(view.speeds) == set(view.members)


def cut(view: View, side: set[str]) -> list[Change]:
    """link_down for every overlay link between `side` and the other members."""
    return [
        Change("link_down", a, b)
        for a, b in (link_ends(key) for key in view.overlay)
        if a in view.members and b in view.members and (a in side) != (b in side)
    ]


# ---------------------------------------------------------------------------- basics


def test_link_key_is_canonical() -> None:
    assert link_key("w3", "w0") == link_key("w0", "w3") == "w0|w3"
    assert link_ends("w0|w3") == ("w0", "w3")
    assert full_mesh(["b", "a", "c"], 2.0) == {"a|b": 2.0, "a|c": 2.0, "b|c": 2.0}
    assert full_mesh(["solo"]) == {}


def test_initial_view_is_a_maximum_spanning_tree_rooted_at_the_smallest_id() -> None:
    members = addresses("c", "a", "d", "b")
    overlay = {"a|b": 1.0, "b|c": 9.0, "c|d": 9.0, "a|d": 1.0, "a|c": 5.0}
    view = initial_view(members, overlay)
    assert view.epoch == 0 and not view.paused and view.down == []
    assert view.root == "a"
    assert view.speeds == dict.fromkeys(members, 1.0)
    assert view.members == members
    assert_spanning_tree(view)
    assert tree_edges(view) == {frozenset("bc"), frozenset("cd"), frozenset("ac")}
    assert view.parent == {"a": None, "c": "a", "b": "c", "d": "c"}
    assert view.neighbours("a") == ["b", "c", "d"]
    assert view.neighbours("b") == ["a", "c"]


def test_initial_view_of_one_member() -> None:
    view = initial_view({"w0": "h:1"}, {})
    assert view.root == "w0" and view.parent == {"w0": None}


# ---------------------------------------------------------------------------- leave, crash


@pytest.mark.parametrize("kind", ["leave", "crash"])
def test_leave_and_crash_drop_the_member_and_repair_the_tree(kind: str) -> None:
    members = addresses("a", "b", "c", "d", "e")
    overlay = {"a|b": 9.0, "b|c": 9.0, "c|d": 9.0, "d|e": 9.0, "a|c": 1.0, "b|d": 2.0}
    view = initial_view(members, overlay)  # the path a-b-c-d-e
    leaver = "c"  # an inner node: d and e lose their way to the root
    outcome = next_view(view, [Change(kind, leaver)], side_of="a")
    new = outcome.view
    assert outcome.majority and not new.paused
    assert outcome.removed == {leaver}
    assert new.epoch == view.epoch + 1
    assert set(new.members) == set(view.members) - {leaver}
    assert new.root == view.root
    assert_spanning_tree(new)
    kept = {e for e in tree_edges(view) if leaver not in e}
    assert kept <= tree_edges(new)
    assert tree_edges(new) == {frozenset("ab"), frozenset("de"), frozenset("bd")}
    assert new.speeds == {m: s for m, s in view.speeds.items() if m != leaver}


def test_several_changes_in_one_decision() -> None:
    view = mesh_view(6)
    changes = [Change("leave", "w2"), Change("crash", "w4"), Change("join", "w9", address="h:9")]
    outcome = next_view(view, changes, side_of="w0")
    assert set(outcome.view.members) == {"w0", "w1", "w3", "w5", "w9"}
    assert outcome.removed == {"w2", "w4"}
    assert outcome.majority
    assert_spanning_tree(outcome.view)


def test_speed_table_updates_the_speeds() -> None:
    view = mesh_view(3)
    speeds = {"w0": 300.0, "w1": 120.0, "w7": 5.0}  # w2 unmeasured, w7 not a member
    new = next_view(view, [Change("leave", "w1")], side_of="w0", speeds=speeds).view
    assert new.speeds == {"w0": 300.0, "w2": 1.0}


# ---------------------------------------------------------------------------- join


def test_join_links_the_joiner_to_everybody_and_keeps_the_tree() -> None:
    view = mesh_view(4)
    outcome = next_view(view, [Change("join", "w4", address="10.0.0.9:1")], side_of="w0")
    new = outcome.view
    assert outcome.majority and outcome.removed == frozenset()
    assert new.members["w4"] == "10.0.0.9:1"
    assert new.speeds["w4"] == 1.0  # the median of the members' speeds (all 1.0 here)
    for other in view.members:
        assert new.overlay[link_key(other, "w4")] == 1.0
    assert tree_edges(view) < tree_edges(new)
    assert new.root == "w0"
    assert_spanning_tree(new)


def test_join_keeps_what_the_overlay_already_says() -> None:
    members = addresses("a", "b", "c")
    view = initial_view(members, {"a|b": 1.0, "b|c": 1.0, "b|z": 7.0})
    view = view.model_copy(update={"down": ["c|z"]})
    new = next_view(view, [Change("join", "z", address="h:z")], side_of="a").view
    assert new.overlay["b|z"] == 7.0  # known bandwidth kept
    assert new.overlay["a|z"] == 1.0  # new links added
    assert "c|z" in new.down  # a link known to be down stays down
    assert new.parent["z"] == "b"  # the widest link attaches it
    assert_spanning_tree(new)


def test_two_joiners_in_one_decision_are_linked_to_each_other() -> None:
    view = mesh_view(2)
    changes = [Change("join", "x", address="h:x"), Change("join", "y", address="h:y")]
    new = next_view(view, changes, side_of="w0").view
    assert link_key("x", "y") in new.overlay
    assert set(new.members) == {"w0", "w1", "x", "y"}
    assert_spanning_tree(new)


# ---------------------------------------------------------------------------- links


def test_link_down_off_the_tree_leaves_the_tree_alone() -> None:
    view = mesh_view(4)
    a, b = next(
        (a, b)
        for a, b in itertools.combinations(sorted(view.members), 2)
        if frozenset((a, b)) not in tree_edges(view)
    )
    outcome = next_view(view, [Change("link_down", a, b)], side_of="w0")
    assert outcome.majority and outcome.removed == frozenset()
    assert outcome.view.parent == view.parent
    assert outcome.view.root == view.root
    assert outcome.view.down == [link_key(a, b)]
    assert link_key(a, b) in outcome.view.overlay  # still known, just down


def test_link_down_on_the_tree_repairs_it_over_live_links() -> None:
    members = addresses("a", "b", "c", "d", "e")
    overlay = {"a|b": 9.0, "b|c": 9.0, "c|d": 9.0, "d|e": 9.0, "a|e": 1.0, "b|d": 2.0}
    view = initial_view(members, overlay)
    assert tree_edges(view) == {frozenset("ab"), frozenset("bc"), frozenset("cd"), frozenset("de")}
    outcome = next_view(view, [Change("link_down", "c", "b")], side_of="a")
    new = outcome.view
    assert outcome.majority and set(new.members) == set(members)
    assert new.down == ["b|c"]
    assert frozenset("bc") not in tree_edges(new)
    assert tree_edges(view) - {frozenset("bc")} <= tree_edges(new)
    assert frozenset("bd") in tree_edges(new)  # the widest live replacement
    assert_spanning_tree(new)


def test_link_up_brings_the_link_back() -> None:
    view = mesh_view(3)
    down = next_view(view, [Change("link_down", "w1", "w0")], side_of="w0").view
    assert down.down == ["w0|w1"]
    up = next_view(down, [Change("link_up", "w0", "w1")], side_of="w0")
    assert up.view.down == []
    assert up.majority and up.view.epoch == 2
    assert frozenset(("w0", "w1")) in live_links(up.view)
    assert tree_edges(down) <= tree_edges(up.view)  # a spanning tree is kept as it is
    assert_spanning_tree(up.view)


def test_link_up_of_an_unknown_link_adds_nothing() -> None:
    members = addresses("a", "b", "c")
    view = initial_view(members, {"a|b": 1.0, "b|c": 1.0})
    new = next_view(view, [Change("link_up", "a", "c")], side_of="a").view
    assert "a|c" not in new.overlay and new.parent == view.parent


# ---------------------------------------------------------------------------- partition


def test_partition_the_larger_side_goes_on_the_other_pauses() -> None:
    view = mesh_view(5)
    big, small = {"w0", "w1", "w2"}, {"w3", "w4"}
    changes = cut(view, small)
    majority = next_view(view, changes, side_of="w1")
    minority = next_view(view, changes, side_of="w4")
    assert majority.majority and not majority.view.paused
    assert not minority.majority and minority.view.paused
    assert set(majority.view.members) == big and majority.removed == small
    assert set(minority.view.members) == small and minority.removed == big
    assert majority.view.root == "w0"
    assert minority.view.root == "w3"  # the fastest of its side, ties to the smallest id
    for outcome in (majority, minority):
        assert outcome.view.epoch == 1
        assert_spanning_tree(outcome.view)


def test_partition_majority_is_by_throughput_not_head_count() -> None:
    speeds = {"w0": 1.0, "w1": 1.0, "w2": 1.0, "w3": 10.0}
    view = mesh_view(4, speeds)
    changes = cut(view, {"w3"})
    assert next_view(view, changes, side_of="w3").majority
    assert not next_view(view, changes, side_of="w0").majority
    assert next_view(view, changes, side_of="w0").view.paused


def test_partition_majority_uses_the_previous_epochs_speeds() -> None:
    view = mesh_view(4, {"w0": 1.0, "w1": 1.0, "w2": 1.0, "w3": 10.0})
    changes = cut(view, {"w3"})
    fresh = {"w0": 100.0, "w1": 100.0, "w2": 100.0, "w3": 1.0}  # measured just now
    outcome = next_view(view, changes, side_of="w0", speeds=fresh)
    assert not outcome.majority
    assert outcome.view.speeds == {"w0": 100.0, "w1": 100.0, "w2": 100.0}


def test_crashed_members_are_not_counted() -> None:
    view = mesh_view(4)
    changes = [Change("crash", "w3"), *cut(view, {"w0", "w3"})]
    # {w1, w2} hold 2 of the 3 live members' throughput; with w3 counted it would be a tie
    # that w0's side wins.
    outcome = next_view(view, changes, side_of="w1")
    assert outcome.majority and not outcome.view.paused
    assert set(outcome.view.members) == {"w1", "w2"}
    lone = next_view(view, changes, side_of="w0")
    assert not lone.majority and lone.view.paused
    assert lone.removed == {"w1", "w2", "w3"}


def test_a_crash_alone_never_pauses_the_survivors() -> None:
    view = mesh_view(3, {"w0": 1.0, "w1": 1.0, "w2": 50.0})
    outcome = next_view(view, [Change("crash", "w2")], side_of="w0")
    assert outcome.majority and not outcome.view.paused


@pytest.mark.parametrize("side_of", ["w0", "w2"])
def test_ties_go_to_the_side_holding_the_smallest_id(side_of: str) -> None:
    view = mesh_view(4)
    changes = cut(view, {"w0", "w3"})
    outcome = next_view(view, changes, side_of=side_of)
    assert outcome.majority == (side_of == "w0")
    assert outcome.view.paused == (side_of != "w0")


def test_three_way_split_without_a_majority_pauses_everybody() -> None:
    view = mesh_view(3)
    changes = [Change("link_down", a, b) for a, b in itertools.combinations(view.members, 2)]
    for member in view.members:
        outcome = next_view(view, changes, side_of=member)
        assert not outcome.majority and outcome.view.paused
        assert outcome.view.members == {member: view.members[member]}
        assert outcome.view.parent == {member: None} and outcome.view.root == member


def test_exactly_one_side_wins_for_simple_speeds() -> None:
    view = mesh_view(4, {"w0": 2.0, "w1": 3.0, "w2": 4.0, "w3": 1.0})
    for size in (1, 2):
        for side in itertools.combinations(sorted(view.members), size):
            changes = cut(view, set(side))
            winners = {
                frozenset(next_view(view, changes, side_of=m).view.members)
                for m in view.members
                if next_view(view, changes, side_of=m).majority
            }
            assert len(winners) == 1


# ---------------------------------------------------------------------------- root


def test_root_stays_while_it_is_alive() -> None:
    view = mesh_view(4, {"w0": 1.0, "w1": 1.0, "w2": 9.0, "w3": 1.0})
    outcome = next_view(view, [Change("leave", "w3")], side_of="w2")
    assert outcome.view.root == "w0"


def test_a_gone_root_is_replaced_by_the_fastest_candidate() -> None:
    view = mesh_view(5, {"w0": 1.0, "w1": 2.0, "w2": 9.0, "w3": 5.0, "w4": 1.0})
    crash = [Change("crash", "w0")]
    assert next_view(view, crash, side_of="w1").view.root == "w2"
    picked = next_view(view, crash, side_of="w1", root_candidates=["w1", "w3", "w0", "zz"])
    assert picked.view.root == "w3"
    assert_spanning_tree(picked.view)
    measured = {"w1": 20.0, "w3": 4.0}
    assert next_view(view, crash, side_of="w1", speeds=measured).view.root == "w1"
    # candidates that are all gone or elsewhere: the fastest of the side
    assert next_view(view, crash, side_of="w1", root_candidates=["w0"]).view.root == "w2"


def test_root_candidates_that_exclude_the_live_root_move_it() -> None:
    """Recovery passes the members holding the latest total; the root must be one of them."""
    view = mesh_view(4)
    outcome = next_view(view, [Change("crash", "w3")], side_of="w0", root_candidates=["w1", "w2"])
    assert outcome.view.root == "w1"
    assert_spanning_tree(outcome.view)
    kept = next_view(view, [Change("crash", "w3")], side_of="w0", root_candidates=["w2", "w0"])
    assert kept.view.root == "w0"


def test_equally_fast_candidates_tie_to_the_smallest_id() -> None:
    view = mesh_view(4)
    outcome = next_view(view, [Change("crash", "w0")], side_of="w2", root_candidates=["w3", "w2"])
    assert outcome.view.root == "w2"


# ---------------------------------------------------------------------------- known bugs


@pytest.mark.parametrize(
    ("n", "speeds", "leavers", "side_of"),
    [
        (2, None, ["w0"], "w1"),  # a two-member job where w0 leaves
        (4, None, ["w0", "w1"], "w2"),  # half of the members leave in one decision
        (3, {"w0": 1.0, "w1": 1.0, "w2": 3.0}, ["w2"], "w0"),  # the fastest member leaves
    ],
)
def test_a_graceful_leave_never_pauses_the_survivors(n, speeds, leavers, side_of) -> None:
    view = mesh_view(n, speeds)
    outcome = next_view(view, [Change("leave", m) for m in leavers], side_of=side_of)
    assert outcome.majority and not outcome.view.paused


def _winners(view, changes) -> set[frozenset[str]]:
    winners = set()
    for member in view.members:
        outcome = next_view(view, changes, side_of=member)
        if outcome.majority:
            winners.add(frozenset(outcome.view.members))
    return winners


@pytest.mark.parametrize(
    ("speeds", "side"),
    [
        ({"w0": 0.25, "w1": 0.5, "w2": 0.25}, {"w1"}),  # an exact tie: w0's side wins
        ({"w0": 0.5, "w1": 0.25, "w2": 0.25}, {"w0"}),
    ],
)
def test_an_exact_tie_goes_to_the_side_holding_the_smallest_id(speeds, side) -> None:
    view = mesh_view(3, speeds)
    holding_w0 = side if "w0" in side else set(view.members) - side
    assert _winners(view, cut(view, side)) == {frozenset(holding_w0)}


@pytest.mark.parametrize(
    ("speeds", "side"),
    [
        ({"w0": 0.3, "w1": 0.4, "w2": 0.1}, {"w1"}),  # float shares once made both sides win
        ({"w0": 0.3, "w1": 0.1, "w2": 0.2}, {"w0"}),  # ... or neither
    ],
)
def test_exactly_one_side_wins_a_near_tie(speeds, side) -> None:
    view = mesh_view(3, speeds)
    assert len(_winners(view, cut(view, side))) == 1


def test_root_tie_prefers_the_smaller_id_even_for_prefixes() -> None:
    members = addresses(*(f"w{i}" for i in range(11)))
    view = initial_view(members, full_mesh(members))
    outcome = next_view(view, [Change("crash", "w0")], side_of="w5", root_candidates=["w10", "w1"])
    assert outcome.view.root == min("w10", "w1") == "w1"


# ---------------------------------------------------------------------------- property

IDS = [f"m{i}" for i in range(6)]
JOINERS = ["j0", "j1"]
ALL = IDS + JOINERS


@st.composite
def overlays(draw: st.DrawFn) -> tuple[dict[str, str], dict[str, float]]:
    """A connected overlay on 2..6 members: a random spanning tree plus extra links."""
    ids = draw(st.lists(st.sampled_from(IDS), min_size=2, max_size=6, unique=True))
    bandwidth = st.sampled_from([1.0, 2.0, 5.0])
    overlay = {}
    for i in range(1, len(ids)):
        overlay[link_key(ids[i], ids[draw(st.integers(0, i - 1))])] = draw(bandwidth)
    pairs = list(itertools.combinations(sorted(ids), 2))
    for a, b in draw(st.lists(st.sampled_from(pairs), max_size=8)):
        overlay[link_key(a, b)] = draw(bandwidth)
    return addresses(*ids), overlay


@st.composite
def changes(draw: st.DrawFn) -> list[Change]:
    kinds = st.sampled_from(["leave", "crash", "join", "link_down", "link_down", "link_up"])
    out = []
    for kind in draw(st.lists(kinds, max_size=6)):
        if kind == "join":
            out.append(Change("join", draw(st.sampled_from(JOINERS)), address="h:j"))
        elif kind.startswith("link"):
            a, b = draw(st.lists(st.sampled_from(ALL), min_size=2, max_size=2, unique=True))
            out.append(Change(kind, a, b))
        else:
            out.append(Change(kind, draw(st.sampled_from(ALL))))
    return out


def expected_side(view: View, batch: list[Change], side_of: str) -> set[str]:
    """The component of `side_of` among the surviving members, by brute force."""
    members = set(view.members)
    overlay = dict(view.overlay)
    down = set(view.down)
    for change in batch:
        if change.kind == "join":
            members.add(change.subject)
            for other in members - {change.subject}:
                overlay.setdefault(link_key(other, change.subject), 1.0)
        elif change.kind == "link_down":
            down.add(link_key(change.subject, change.peer))
        elif change.kind == "link_up":
            down.discard(link_key(change.subject, change.peer))
    members -= {c.subject for c in batch if c.kind in ("leave", "crash")}
    edges = {link_ends(k): 1.0 for k in overlay if k not in down and set(link_ends(k)) <= members}
    return next(set(c) for c in connected_components(members, edges) if side_of in c)


@settings(max_examples=150, deadline=None)
@given(overlays(), st.lists(changes(), min_size=1, max_size=3), st.data())
def test_next_view_is_always_a_spanning_tree_of_the_side(graph, batches, data) -> None:
    members, overlay = graph
    view = initial_view(members, overlay)
    assert_spanning_tree(view)
    for batch in batches:
        gone = {c.subject for c in batch if c.kind in ("leave", "crash")}
        survivors = sorted(
            (set(view.members) | {c.subject for c in batch if c.kind == "join"}) - gone
        )
        if not survivors:
            return
        side_of = data.draw(st.sampled_from(survivors))
        outcome = next_view(view, batch, side_of=side_of)
        new = outcome.view
        assert_spanning_tree(new)
        assert set(new.members) == expected_side(view, batch, side_of)
        assert new.epoch == view.epoch + 1
        assert new.paused == (not outcome.majority)
        assert outcome.removed == frozenset(view.members) - set(new.members)
        assert set(new.down) <= set(view.down) | {
            link_key(c.subject, c.peer) for c in batch if c.kind == "link_down"
        }
        if view.root in new.members:
            assert new.root == view.root
        still_valid = {e for e in tree_edges(view) if e <= set(new.members)} & live_links(new)
        assert still_valid <= tree_edges(new)
        view = new


def test_a_joiner_without_a_measured_speed_gets_the_median_members_share() -> None:
    """Not a token share: a newcomer counted at 1 sample/s among members doing thousands
    would compute nothing until the next change of view."""
    view = mesh_view(3)
    speeds = {"w0": 900.0, "w1": 1000.0, "w2": 4000.0}
    new = next_view(view, [Change("join", "w3", address="h:3")], side_of="w0", speeds=speeds)
    assert new.view.speeds == {**speeds, "w3": 1000.0}


def test_a_joiner_takes_a_reduced_share_of_its_first_step_only() -> None:
    """It switches in a little after the others: a full first share leaves them idle."""
    view = mesh_view(3)
    speeds = {"w0": 900.0, "w1": 1000.0, "w2": 4000.0}
    joined = next_view(
        view, [Change("join", "w3", address="h:3")], side_of="w0", speeds=speeds
    ).view
    assert joined.joining == ["w3"]
    first = joined.shares(first_step=True)
    assert first["w3"] == 1000.0 * FIRST_STEP_SHARE < joined.speeds["w3"]
    assert {m: v for m, v in first.items() if m != "w3"} == speeds
    assert joined.shares(first_step=False) == joined.speeds
    # the next change of view has nobody new in it
    left = next_view(joined, [Change("leave", "w0")], side_of="w1").view
    assert left.joining == []
    assert left.shares(first_step=True) == left.speeds
