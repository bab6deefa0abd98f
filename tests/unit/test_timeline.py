"""The launcher's timeline: records as members send them, turned into report events."""

from __future__ import annotations

import math

import pytest
from chaos_cli.local.churn import ChurnEvent
from chaos_cli.local.timeline import Fired, Timeline

pytestmark = pytest.mark.unit

STEP_S = 0.1


# Records with exactly the keys of the member's reports (`Outbox.report(...)` calls).


def progress(worker: str, step: int, t: float, *, loss: float = 1.0, members: int = 4) -> dict:
    return {
        "kind": "progress",
        "worker": worker,
        "step": step,
        "loss": loss,
        "epoch": 0,
        "members": members,
        "root": "w0",
        "samples_per_s": 100.0,
        "t": t,
    }


def detected_crash(worker: str, subject: str, t: float) -> dict:
    return {"kind": "detected", "worker": worker, "event": "crash", "subject": subject, "t": t}


def detected(worker: str, event: str, t: float, peer: str = "") -> dict:
    """A planned change proposed by `worker` about itself (leave, link_down, link_up)."""
    return {
        "kind": "detected",
        "worker": worker,
        "event": event,
        "subject": worker,
        "peer": peer,
        "t": t,
        "id": f"{event}:{worker}:{peer}:abcd1234",
    }


def agreed(worker: str, decision: str, t: float, members: list[str], epoch: int = 1) -> dict:
    return {
        "kind": "agreed",
        "worker": worker,
        "decision": decision,
        "epoch": epoch,
        "effective_step": 12,
        "members": sorted(members),
        "t": t,
    }


def installed(worker: str, decision: str, t: float, *, paused: bool = False) -> dict:
    return {
        "kind": "installed",
        "worker": worker,
        "decision": decision,
        "epoch": 1,
        "step": 10,
        "members": 3,
        "paused": paused,
        "t": t,
    }


def standby(worker: str, t: float) -> dict:
    return {"kind": "standby", "worker": worker, "t": t}


def join_requested(worker: str, t: float) -> dict:
    return {"kind": "join_requested", "worker": worker, "t": t}


def paused(worker: str, t: float, members: list[str]) -> dict:
    return {
        "kind": "paused",
        "worker": worker,
        "reason": "partition minority",
        "members": members,
        "t": t,
    }


def steady(workers: list[str], steps: range, *, start: float = 100.0) -> list[dict]:
    """Every worker reports every step, one step each STEP_S."""
    return [
        progress(w, s, start + s * STEP_S, loss=10.0 / (s + 1), members=len(workers))
        for s in steps
        for w in workers
    ]


def timeline(records: list[dict], fired: list[Fired] = ()) -> Timeline:
    line = Timeline()
    for record in records:
        line.add(record)
    line.fired.extend(fired)
    return line


# ---------------------------------------------------------------------------- curves


def test_loss_curve_first_report_wins_and_is_sorted_by_step() -> None:
    line = timeline(
        [
            progress("w1", 1, 1.1, loss=0.9),
            progress("w0", 0, 1.0, loss=2.0),
            progress("w0", 1, 1.2, loss=0.5),  # a later report of step 1 does not count
            progress("w2", 0, 1.3, loss=7.0),
            {"kind": "exit", "worker": "w0", "step": 2, "completed": 1},
        ]
    )
    assert line.loss_curve() == [(0, 2.0), (1, 0.9)]
    assert line.step_times() == {0: 1.0, 1: 1.1}
    assert [r["worker"] for r in line.of("progress")] == ["w1", "w0", "w0", "w2"]


def test_members_curve_per_step() -> None:
    line = timeline(
        [
            progress("w0", 0, 1.0, members=4),
            progress("w1", 0, 1.0, members=4),
            progress("w0", 1, 1.1, members=3),
            progress("w4", 1, 1.2, members=4),  # first report wins here too
            progress("w0", 2, 1.3, members=4),
        ]
    )
    assert line.members_curve() == [(0, 4), (1, 3), (2, 4)]


def test_empty_timeline() -> None:
    line = Timeline()
    assert line.loss_curve() == [] and line.members_curve() == []
    assert line.steps_lost() == 0
    assert line.events() == []


@pytest.mark.parametrize(
    ("steps", "lost"),
    [
        ([0, 1, 2, 3], 0),
        ([0, 1, 4, 5], 2),
        ([3, 5, 9], 4),
        ([7], 0),
        ([0, 1, 2, 10], 7),
    ],
)
def test_steps_lost_counts_the_gaps(steps: list[int], lost: int) -> None:
    line = timeline([progress("w0", s, float(s + 1)) for s in reversed(steps)])
    assert line.steps_lost() == lost


# ---------------------------------------------------------------------------- events


def test_leave_handling_is_from_detection_to_the_last_member_agreeing() -> None:
    workers = ["w0", "w1", "w2", "w3"]
    records = steady(workers, range(10))
    fired_at = 100.45
    records += [
        detected("w2", "leave", 100.46),
        agreed("w0", "d1", 100.47, ["w0", "w1", "w3"]),
        agreed("w1", "d1", 100.48, ["w0", "w1", "w3"]),
        agreed("w3", "d1", 100.496, ["w0", "w1", "w3"]),
        agreed("w0", "d2", 100.9, ["w0", "w1"]),  # a later decision does not count
        installed("w0", "d1", 100.6),
    ]
    records += steady(["w0", "w1", "w3"], range(10, 15))
    line = timeline(records, [Fired(ChurnEvent("leave", 4, "w2"), fired_at, 4)])
    (event,) = line.events()
    assert event.type == "leave" and event.worker == "w2" and event.step == 4
    assert event.handling_ms == pytest.approx(36.0)
    assert event.scale_out_delay_s is None
    assert event.steps_lost == 0
    assert event.incumbent_stall_s == pytest.approx(0.0)
    assert event.detail == ""


def test_detections_from_before_the_event_are_ignored() -> None:
    records = [
        *steady(["w0", "w1", "w2"], range(5)),
        detected("w2", "leave", 50.0),  # an older leave of the same worker
        agreed("w0", "d0", 50.1, ["w0", "w1"]),
        detected("w2", "leave", 100.31),
        agreed("w0", "d1", 100.33, ["w0", "w1"]),
    ]
    line = timeline(records, [Fired(ChurnEvent("leave", 3, "w2"), 100.3, 3)])
    assert line.events()[0].handling_ms == pytest.approx(20.0)


def test_an_event_that_was_never_detected_has_no_handling_time() -> None:
    line = timeline(steady(["w0", "w1"], range(5)), [Fired(ChurnEvent("leave", 2, "w1"), 1.0, 2)])
    (event,) = line.events()
    assert math.isnan(event.handling_ms)
    assert event.detail == ""


def test_crash_detail_says_when_it_was_detected_and_training_resumed() -> None:
    records = steady(["w0", "w1", "w2", "w3"], range(6))  # steps at 100.0 .. 100.5
    crash_at = 100.55
    records += [
        detected_crash("w0", "w1", 99.0),  # a stale suspicion, before the crash
        detected_crash("w2", "w1", 101.6),
        detected_crash("w0", "w1", 101.55),
        agreed("w0", "r1", 101.7, ["w0", "w2", "w3"]),
        agreed("w2", "r1", 101.75, ["w0", "w2", "w3"]),
        agreed("w3", "r1", 101.72, ["w0", "w2", "w3"]),
        installed("w0", "r1", 101.76),
    ]
    records += steady(["w0", "w2", "w3"], range(6, 10), start=101.45)  # step 6 at 102.05
    line = timeline(records, [Fired(ChurnEvent("crash", 5, "w1"), crash_at, 5)])
    (event,) = line.events()
    assert event.type == "crash" and event.worker == "w1"
    assert event.handling_ms == pytest.approx(200.0)
    assert event.detail == "detected after 1.000s, resumed after 1.500s"
    assert event.steps_lost == 0
    # the step after the crash took 1.55 s instead of the usual 0.1 s
    assert event.incumbent_stall_s == pytest.approx(1.45)


def test_hang_is_reported_as_a_crash() -> None:
    records = [
        *steady(["w0", "w1", "w2"], range(3)),
        detected_crash("w0", "w2", 101.5),
        agreed("w0", "r1", 101.6, ["w0", "w1"]),
        *steady(["w0", "w1"], range(3, 5), start=101.5),
    ]
    line = timeline(records, [Fired(ChurnEvent("hang", 2, "w2"), 100.25, 2)])
    (event,) = line.events()
    assert event.type == "crash" and event.worker == "w2"
    assert event.handling_ms == pytest.approx(100.0)
    assert event.detail.startswith("detected after 1.250s, resumed after ")


def test_join_scale_out_delay_is_from_request_to_the_joiners_first_step() -> None:
    records = [standby("w3", 99.0), *steady(["w0", "w1", "w2"], range(10))]
    records += [
        join_requested("w3", 100.52),
        agreed("w1", "j0", 100.5, ["w0", "w1", "w2"]),  # before the request: not this join
        agreed("w0", "j1", 100.6, ["w0", "w1", "w2", "w3"]),
        agreed("w2", "j1", 100.61, ["w0", "w1", "w2", "w3"]),
        agreed("w3", "j1", 100.65, ["w0", "w1", "w2", "w3"]),
    ]
    records += steady(["w0", "w1", "w2"], range(10, 12))
    records += [progress("w3", 12, 101.3), progress("w3", 13, 101.4)]
    line = timeline(records, [Fired(ChurnEvent("join", 5, "w3"), 100.5, 5)])
    (event,) = line.events()
    assert event.type == "join" and event.worker == "w3"
    assert event.scale_out_delay_s == pytest.approx(0.78)
    assert event.handling_ms == pytest.approx(130.0)
    assert event.detail.startswith("stop-and-copy")


def test_a_join_that_never_trained_has_no_delay() -> None:
    records = [*steady(["w0", "w1"], range(5)), join_requested("w2", 100.2)]
    line = timeline(records, [Fired(ChurnEvent("join", 2, "w2"), 100.2, 2)])
    (event,) = line.events()
    assert event.scale_out_delay_s is None
    assert event.detail == "join did not complete"
    assert math.isnan(event.handling_ms)


def test_link_down_detected_by_either_end_and_a_paused_minority() -> None:
    records = steady(["w0", "w1", "w2"], range(5))
    records += [
        detected("w2", "link_down", 100.43, peer="w0"),
        detected("w0", "link_down", 100.42, peer="w2"),
        agreed("w0", "p1", 100.5, ["w0", "w1"]),
        agreed("w2", "p1b", 100.52, ["w2"]),
        paused("w2", 100.53, ["w2"]),
    ]
    line = timeline(records, [Fired(ChurnEvent("link-down", 4, "w0", "w2"), 100.41, 4)])
    (event,) = line.events()
    assert event.type == "link_down" and event.worker == "w0-w2"
    assert event.handling_ms == pytest.approx(80.0)
    assert event.detail == "partition: minority side paused"


def test_link_up_without_a_pause_has_no_detail() -> None:
    records = [
        *steady(["w0", "w1", "w2"], range(5)),
        paused("w2", 50.0, ["w2"]),  # an older partition
        detected("w2", "link_up", 100.45, peer="w0"),
        agreed("w0", "u1", 100.47, ["w0", "w1", "w2"]),
    ]
    line = timeline(records, [Fired(ChurnEvent("link-up", 4, "w0", "w2"), 100.44, 4)])
    (event,) = line.events()
    assert event.type == "link_up" and event.worker == "w0-w2"
    assert event.handling_ms == pytest.approx(20.0)
    assert event.detail == ""


def test_steps_lost_is_reported_on_every_event() -> None:
    records = [*steady(["w0"], range(3)), *steady(["w0"], range(5, 8))]
    fired = [
        Fired(ChurnEvent("leave", 1, "w1"), 100.1, 1),
        Fired(ChurnEvent("link-down", 6, "w0", "w2"), 100.6, 6),
    ]
    events = timeline(records, fired).events()
    assert [e.steps_lost for e in events] == [2, 2]


# ---------------------------------------------------------------------------- known bugs


def test_a_crash_nobody_detected_still_gives_an_event() -> None:
    # e.g. default_churn(3, ...) crashes w1 after w1 has already left
    records = steady(["w0", "w2"], range(10))
    line = timeline(records, [Fired(ChurnEvent("crash", 4, "w1"), 100.45, 4)])
    (event,) = line.events()
    assert event.type == "crash" and math.isnan(event.handling_ms)


def test_a_joins_stall_is_the_time_the_incumbents_waited_for_the_newcomer() -> None:
    """Incumbents wait for a newcomer only once it takes part: in each of its first steps,
    for as long as its gradient was ready after theirs. Slower steps while it pulled are the
    slowdown, not idle time."""
    records = [standby("w3", 99.0), *steady(["w0", "w1", "w2"], range(10))]
    records += [join_requested("w3", 100.52)]
    # while w3 pulls, steps 6..9 each take 20 ms longer than 100 ms
    for step, t in zip(range(10, 14), (101.12, 101.24, 101.36, 101.48), strict=True):
        records += [progress(w, step, t) | {"ready_t": t - 0.02} for w in ("w0", "w1", "w2")]
    ready = {14: 0.005, 15: 0.0, 16: -0.01, 17: 0.03}  # w3's lag behind the last incumbent
    for step, lag in ready.items():
        t = 101.48 + (step - 13) * 0.1
        records += [progress(w, step, t) | {"ready_t": t - 0.05} for w in ("w0", "w1", "w2")]
        records += [progress("w3", step, t) | {"ready_t": t - 0.05 + lag}]
    line = timeline(records, [Fired(ChurnEvent("join", 9, "w3"), 100.5, 9)])
    (event,) = line.events()
    # steps 14, 15, 16 are its first three: 5 ms + 0 + 0 (it was early); step 17 is past them
    assert event.incumbent_stall_s == pytest.approx(0.005)
    assert event.incumbent_slowdown_s is not None and event.incumbent_slowdown_s > 0.05


# ---------------------------------------------------------------------------- pause


def test_a_pause_names_when_its_worker_was_removed_and_when_it_rejoined() -> None:
    fired = Fired(ChurnEvent("pause", 10, "w2"), 101.0, 10)
    replaced = agreed("w0", "d0", 102.1, ["w0", "w1", "w2"])  # planned, never installed
    removed = agreed("w0", "d1", 102.2, ["w0", "w1"])
    back = {**agreed("w0", "d2", 105.0, ["w0", "w1", "w2"], epoch=2), "effective_step": 40}
    stale = agreed("w2", "d0", 104.0, ["w0", "w1", "w2"])  # w2 wakes and hears it late
    records = [
        *steady(["w0", "w1", "w2"], range(0, 50)),
        detected_crash("w0", "w2", 102.05),
        replaced,
        removed,
        installed("w0", "d1", 102.3),
        stale,
        back,
        installed("w0", "d2", 105.1),
    ]
    (event,) = timeline(records, [fired]).events()
    assert event.type == "pause" and event.worker == "w2"
    assert event.detail == "removed at step 12, rejoined at step 40"
    (alone,) = timeline(records[:-2], [fired]).events()
    assert alone.detail == "removed at step 12, did not rejoin"
    (unnoticed,) = timeline(records[:-6], [fired]).events()
    assert unnoticed.detail == "not removed"
