"""Churn schedules of `chaos run --churn`: syntax, errors and the default schedule."""

from __future__ import annotations

import re

import pytest
from chaos_cli.local.churn import KINDS, ChurnError, ChurnEvent, default_churn, parse_churn

pytestmark = pytest.mark.unit


def test_the_documented_example_parses() -> None:
    spec = "leave:w2@40,crash:w1@80,link-down:w0-w3@100,link-up:w0-w3@120,join@150"
    assert parse_churn(spec, 4) == [
        ChurnEvent("leave", 40, "w2"),
        ChurnEvent("crash", 80, "w1"),
        ChurnEvent("link-down", 100, "w0", "w3"),
        ChurnEvent("link-up", 120, "w0", "w3"),
        ChurnEvent("join", 150, "w4"),
    ]


def test_every_kind_and_its_label() -> None:
    spec = (
        "hang:w1@8, join:w9@5 ,leave:w0@3,crash:w2@4,link-down:w3-w9@9,link-up:w9-w3@10,pause:w1@6"
    )
    events = parse_churn(spec, 4)
    assert {e.kind for e in events} == set(KINDS)
    assert [e.label for e in events] == [
        "leave:w0@3",
        "crash:w2@4",
        "join:w9@5",
        "pause:w1@6",  # a paused worker comes back: the hang may name it
        "hang:w1@8",
        "link-down:w3-w9@9",
        "link-up:w9-w3@10",
    ]


@pytest.mark.parametrize("spec", ["", "none", "  none  ", "   "])
def test_no_churn(spec: str) -> None:
    assert parse_churn(spec, 4) == []


def test_events_are_sorted_by_step_keeping_the_written_order_of_ties() -> None:
    events = parse_churn("crash:w3@50,leave:w1@7,link-down:w0-w2@7,join@0", 4)
    assert [(e.step, e.kind) for e in events] == [
        (0, "join"),
        (7, "leave"),
        (7, "link-down"),
        (50, "crash"),
    ]


def test_joiners_are_numbered_after_the_initial_workers() -> None:
    events = parse_churn("join@5,join:w9@6,join@7", 3)
    assert [e.worker for e in events] == ["w3", "w9", "w5"]
    # a joiner may be the target of events after its join, whatever the written order
    later = parse_churn("crash:w3@10,link-down:w0-w3@9,join@5", 3)
    assert [e.label for e in later] == ["join:w3@5", "link-down:w0-w3@9", "crash:w3@10"]


@pytest.mark.parametrize(
    ("item", "why"),
    [
        ("crash:w1", "is not KIND:TARGET@STEP"),  # no step
        ("crash:w1@", "is not KIND:TARGET@STEP"),
        ("crash:w1@-3", "is not KIND:TARGET@STEP"),
        ("crash:w1@1.5", "is not KIND:TARGET@STEP"),
        ("Crash:w1@3", "is not KIND:TARGET@STEP"),
        ("crash w1@3", "is not KIND:TARGET@STEP"),
        ("crash:w 1@3", "is not KIND:TARGET@STEP"),
        ("crash:@3", "is not KIND:TARGET@STEP"),
        ("@3", "is not KIND:TARGET@STEP"),
        ("", "is not KIND:TARGET@STEP"),
        ("explode:w1@3", "unknown event 'explode'"),
        ("link_down:w0-w1@3", "is not KIND:TARGET@STEP"),
        ("crash@3", "needs a worker"),
        ("leave@3", "needs a worker"),
        ("hang@3", "needs a worker"),
        ("pause@3", "needs a worker"),
        ("crash:w7@3", "names w7, which is not a worker"),
        ("leave:x@3", "names x, which is not a worker"),
        ("link-down:w0@3", "needs two different workers"),
        ("link-up@3", "needs two different workers"),
        ("link-down:w1-w1@3", "needs two different workers"),
        ("link-down:w0-w1-w2@3", "needs two different workers"),
        ("link-up:w0-w8@3", "names w8, which is not a worker"),
        ("join:w2@3", "joins w2, which already exists"),
    ],
)
def test_malformed_items_are_named_in_the_error(item: str, why: str) -> None:
    spec = f"leave:w0@1,{item},crash:w3@2"
    with pytest.raises(ChurnError) as raised:
        parse_churn(spec, 4)
    message = str(raised.value)
    assert message.startswith("--churn: ")
    assert repr(item) in message
    assert why in message


def test_a_joiner_name_cannot_be_taken_twice() -> None:
    with pytest.raises(ChurnError, match=r"'join:w9@6' joins w9, which already exists"):
        parse_churn("join:w9@5,join:w9@6", 4)
    with pytest.raises(ChurnError, match=r"'join:w4@6' joins w4"):
        parse_churn("join@5,join:w4@6", 4)  # the first join is named w4


@pytest.mark.parametrize(
    ("spec", "why"),
    [
        ("crash:w1@10,crash:w1@20", "'crash:w1@20' names w1, which crashed at step 10"),
        ("crash:w1@10,leave:w1@20", "'leave:w1@20' names w1, which crashed at step 10"),
        ("hang:w1@20,crash:w1@10", "'hang:w1@20' names w1, which crashed at step 10"),
        ("leave:w2@5,hang:w2@6", "'hang:w2@6' names w2, which left at step 5"),
        ("hang:w2@5,link-down:w0-w2@6", "'link-down:w0-w2@6' names w2, which hung at step 5"),
        ("crash:w2@5,pause:w2@6", "'pause:w2@6' names w2, which crashed at step 5"),
        ("crash:w1@3,join:w1@5", "'join:w1@5' joins w1, which already exists"),
        ("crash:w4@3,join@5", "'crash:w4@3' names w4, which is not a worker of this job by step 3"),
        (
            "link-down:w0-w1@3,link-down:w1-w0@4",
            "'link-down:w1-w0@4': the link w1-w0 is already down",
        ),
        ("link-up:w0-w1@3", "'link-up:w0-w1@3': the link w0-w1 is not down"),
        ("leave:w0@1,crash:w1@2,hang:w2@2,leave:w3@3", "'leave:w3@3' leaves no worker"),
    ],
)
def test_an_event_on_a_worker_that_is_not_there_is_named(spec: str, why: str) -> None:
    with pytest.raises(ChurnError, match=re.escape(f"--churn: {why}")):
        parse_churn(spec, 4)


def test_a_paused_worker_stays_in_the_job() -> None:
    events = parse_churn("pause:w1@5,pause:w1@9,link-down:w1-w2@10,leave:w1@12", 3)
    assert [e.kind for e in events] == ["pause", "pause", "link-down", "leave"]
    # pausing every worker leaves them all in the job: not a schedule without workers
    assert len(parse_churn("pause:w0@1,pause:w1@1", 2)) == 2


def test_churn_error_is_a_value_error() -> None:
    assert issubclass(ChurnError, ValueError)


@pytest.mark.parametrize("workers", range(3, 9))
@pytest.mark.parametrize("steps", [20, 21, 37, 50, 99, 200, 333, 500])
def test_default_churn_parses_and_fits_in_the_job(workers: int, steps: int) -> None:
    spec = default_churn(workers, steps)
    events = parse_churn(spec, workers)
    assert all(0 < e.step < steps for e in events)
    if workers == 3:  # too few members to lose two and still cut a link
        assert [e.kind for e in events] == ["crash", "join"]
        return
    assert [e.kind for e in events] == ["leave", "crash", "link-down", "link-up", "join"]
    assert [e.step for e in events] == sorted({e.step for e in events})  # distinct steps
    down, up = events[2], events[3]
    assert (down.worker, down.peer) == (up.worker, up.peer)
    assert events[4].worker == f"w{workers}"


@pytest.mark.parametrize("workers", [0, 1, 2])
def test_default_churn_needs_three_workers(workers: int) -> None:
    assert default_churn(workers, 200) == "none"
    assert parse_churn(default_churn(workers, 200), workers) == []


@pytest.mark.parametrize("workers", range(4, 9))
def test_default_churn_crashes_a_worker_that_is_still_there(workers: int) -> None:
    events = parse_churn(default_churn(workers, 200), workers)
    leave = next(e for e in events if e.kind == "leave")
    crash = next(e for e in events if e.kind == "crash")
    assert crash.worker != leave.worker
    link = next(e for e in events if e.kind == "link-down")
    assert {leave.worker, crash.worker}.isdisjoint({link.worker, link.peer})


@pytest.mark.parametrize("workers", [3, 4, 8])
def test_default_churn_fits_any_number_of_steps(workers: int) -> None:
    assert default_churn(workers, 1) == default_churn(workers, 2) == "none"
    assert all(e.step < 3 for e in parse_churn(default_churn(workers, 3), workers))


def test_three_worker_default_churn_crashes_a_worker_and_admits_a_new_one() -> None:
    events = parse_churn(default_churn(3, 200), 3)
    assert [(e.kind, e.worker) for e in events] == [("crash", "w1"), ("join", "w3")]


def test_reconciled_names_follow_the_reconcile_in_step_order() -> None:
    """A crashed member's replacement takes the next ordinal, and so does each join."""
    events = parse_churn("join@30,crash:w1@10,crash:w3@20,leave:w4@40", 3, reconciled=True)
    assert events == [
        ChurnEvent("crash", 10, "w1"),  # replaced by w3
        ChurnEvent("crash", 20, "w3"),  # replaced by w4
        ChurnEvent("join", 30, "w5"),
        ChurnEvent("leave", 40, "w4"),
    ]
    with pytest.raises(ChurnError, match="w3"):
        parse_churn("crash:w3@20", 3, reconciled=True)  # no crash before: no w3 yet
    with pytest.raises(ChurnError, match=r"join@5 \(it will be w3\)"):
        parse_churn("join:w9@5", 3, reconciled=True)
    assert parse_churn("join:w3@5", 3, reconciled=True) == [ChurnEvent("join", 5, "w3")]
