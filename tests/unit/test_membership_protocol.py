"""The membership protocol of one member (`Membership`), driven by tables.

Each row is `(now, event, out)`: at clock time `now` the event happens to the member under
test (a message arrives, the launcher commands, the trainer reaches a step boundary or
starts a recovery), and `out` is everything the member does in response, in order: the
messages it floods or sends, its reports, the links it opens, and what the other roles
hear (listeners) or the trainer is told. A row's `out` is checked right after its event,
so a message expected there went out synchronously, inside the event's handling. The
resulting view is checked at the end. The clock is fake; the outbox records.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
from chaos_worker.membership.listeners import Listeners
from chaos_worker.membership.protocol import Membership
from chaos_worker.membership.view import View, full_mesh, initial_view
from chaos_worker.net.wire import Cause, Decision, MemberStatus, Proposal, WireMessage
from chaos_worker.ports import Progress
from chaos_worker.telemetry.telemetry import Telemetry

pytestmark = pytest.mark.unit

FAILURE_TIMEOUT_S = 1.0


def mesh(*ids: str) -> View:
    """Epoch 0 over a full mesh: the tree is a star around the smallest id."""
    members = {m: f"h:{m}" for m in ids}
    return initial_view(members, full_mesh(members))


W4 = mesh("w0", "w1", "w2", "w3")
W3 = mesh("w0", "w1", "w2")


def render(message: WireMessage) -> str:
    if isinstance(message, Proposal):
        peer = f"-{message.peer}" if message.peer else ""
        return f"{message.kind} {message.subject}{peer}"
    if isinstance(message, MemberStatus):
        return f"status {message.origin} done={message.completed}"
    if isinstance(message, Decision):
        return f"decision {describe(message.view)} T={message.effective_step}" + (
            f" replay={message.replay_step}" if message.replay_step is not None else ""
        )
    return type(message).__name__


def describe(view: View) -> str:
    """e1 w0,w1,w2 root=w0 tree=w1:w0,w2:w0 [down=w1|w2] [paused]"""
    tree = ",".join(f"{m}:{p}" for m, p in sorted(view.parent.items()) if p is not None)
    text = f"e{view.epoch} {','.join(sorted(view.members))} root={view.root} tree={tree}"
    if view.down:
        text += f" down={','.join(view.down)}"
    return text + (" paused" if view.paused else "")


REPORTED = {
    "detected": ("event", "subject", "peer"),
    "agreed": ("epoch", "effective_step"),
    "installed": ("epoch", "step", "paused"),
    "paused": ("members",),
}


@dataclass
class Recorder:
    """The `Outbox` of the member under test, and its listeners: one log of both."""

    log: list[str] = field(default_factory=list)
    links: set[str] = field(default_factory=set)

    def send(self, peer: str, message: WireMessage, payload: bytes | memoryview = b"") -> bool:
        self.log.append(f"send {peer} {render(message)}")
        return True

    def flood(self, message: WireMessage) -> None:
        self.log.append(f"flood {render(message)}")

    def report(self, record: str, **fields: Any) -> None:
        shown = [str(fields[k]) for k in REPORTED.get(record, ()) if fields.get(k, "") != ""]
        self.log.append(" ".join(["report", record, *shown]))

    def connect(self, peer: str, address: str) -> None:
        self.links.add(peer)
        self.log.append(f"connect {peer}")

    def disconnect(self, peer: str) -> None:
        self.links.discard(peer)

    def peers(self) -> list[str]:
        return sorted(self.links)


class Harness:
    """A `Membership` with a fake clock and a recording outbox, and the trainer's part."""

    def __init__(self, me: str, view: View, *, step: int = 5, down_sent=None) -> None:
        self.now = 0.0
        self.out = Recorder()
        self.progress = Progress(step=step, completed=step - 1)
        listeners = Listeners(
            aborting=[lambda: self.out.log.append("hear abort")],
            admitted=[
                lambda _d, _old, new, send: self.out.log.append(
                    f"hear admitted {','.join(new) or '-'}" + (" +state" if new and send else "")
                )
            ],
            installed=[lambda: self.out.log.append("hear installed")],
            joining=[lambda d: self.out.log.append(f"hear joining {render(d)}")],
            rejoin=[lambda: self.out.log.append("hear rejoin")],
        )
        clock = lambda: self.now  # noqa: E731
        self.membership = Membership(
            me,
            outbox=self.out,
            clock=clock,
            progress=self.progress,
            telemetry=Telemetry(me, outbox=self.out, clock=clock, metrics=None),
            failure_timeout_s=FAILURE_TIMEOUT_S,
            down_sent=lambda: down_sent,
            listeners=listeners,
        )
        self.membership.begin(view)
        self.tasks: list[asyncio.Task] = []
        self.decisions: list[Decision] = []  # what the other side decided (by `decide`)

    async def play(self, rows: list[tuple[float, Event, list[str]]]) -> None:
        for now, event, out in rows:
            self.now = now
            start = len(self.out.log)
            await event(self)
            for _ in range(20):  # let started tasks (a boundary, a recovery) run their turn
                await asyncio.sleep(0)
            if out is not None:  # None: not checked (the row only sets the scene)
                assert self.out.log[start:] == out, f"t={now}: {event.__name__}"
        for task in self.tasks:
            task.cancel()

    def start(self, coroutine: Awaitable[None]) -> None:
        self.tasks.append(asyncio.ensure_future(coroutine))


Event = Callable[[Harness], Awaitable[None]]


def event(fn: Callable[[Harness], None]) -> Event:
    async def run(h: Harness) -> None:
        fn(h)

    run.__name__ = fn.__name__
    return run


def proposal(kind: str, subject: str, peer: str = "", *, origin: str = "", **extra) -> Event:
    """A proposal flooded to the member under test (as if from `origin`, else `subject`)."""
    message = Proposal(
        id=f"{kind}:{subject}:{peer}",
        origin=origin or subject,
        kind=kind,
        subject=subject,
        peer=peer,
        detected_at=0.0,
        epoch=0,
        **extra,
    )
    return event(lambda h: h.membership.on_proposal(message, h.now))


def command(kind: str, peer: str = "") -> Event:
    """The launcher's command: this member leaves, or its link to `peer` goes down/up."""
    if kind == "leave":
        return event(lambda h: h.membership.leave(h.now))
    return event(lambda h: h.membership.propose(kind, h.membership.me, h.now, peer=peer))


def silent(member: str) -> Event:
    """The failure detector gives up on `member` (or its connection closed)."""
    return event(lambda h: h.membership.suspect(member, h.now))


def watch() -> Event:
    """The failure detector's periodic look at a recovery round."""
    return event(lambda h: h.membership.try_decide_recovery(h.now))


def status(origin: str, completed: int, round: int = 1) -> Event:
    message = MemberStatus(
        id=f"status:{origin}:0:{round}", origin=origin, epoch=0, round=round, completed=completed
    )
    return event(lambda h: h.membership.on_status(message, h.now))


def decision(
    view: View, effective_step: int, *, immediate: bool = False, joins: tuple[str, ...] = ()
) -> Event:
    """A decision flooded to the member under test (from the root, w0), admitting the
    members `joins` (a copy join each)."""
    causes = [Cause(id=f"join:{m}", kind="join", subject=m, detected_at=0.0) for m in joins]
    message = Decision(
        id=f"d{view.epoch}",
        origin="w0",
        view=view,
        effective_step=effective_step,
        immediate=immediate,
        causes=causes,
    )

    def take(h: Harness) -> None:
        h.decisions.append(message)
        h.membership.on_decision(message, h.now)

    take.__name__ = "decision"
    return event(take)


def boundary(step: int) -> Event:
    """The trainer reaches the boundary of `step` (and reports whether it goes on)."""

    async def run(h: Harness) -> None:
        h.progress.step, h.progress.completed = step, step - 1

        async def wait() -> None:
            h.out.log.append("trainer waits")
            stop = await h.membership.at_boundary()
            h.out.log.append("trainer stops" if stop else "trainer trains")

        h.start(wait())

    run.__name__ = f"boundary({step})"
    return run


def recovery() -> Event:
    """The trainer's recovery: the protocol's round, then its replay, then `recovered`."""

    async def run(h: Harness) -> None:
        async def recover() -> None:
            decided = await h.membership.recover()
            replay = decided.replay_step
            h.out.log.append("trainer redoes" if replay is None else f"trainer replays {replay}")
            h.progress.step = decided.effective_step
            h.membership.recovered(decided, h.now)

        h.start(recover())

    run.__name__ = "recovery"
    return run


def install_pending(step: int) -> Event:
    """The newcomer's part of a rejoin: the state (of `step`) arrived; install the view."""

    def install(h: Harness) -> None:
        h.progress.step, h.progress.completed = step, step - 1
        h.membership.install(h.membership.pending, h.now, send_state=False)

    return event(install)


def run_table(me: str, view: View, rows, **harness) -> Harness:
    h_box: list[Harness] = []

    async def main() -> None:
        h = Harness(me, view, **harness)
        h_box.append(h)
        await h.play(rows)

    asyncio.run(main())
    return h_box[0]


STAR3 = "tree=w1:w0,w2:w0"
STAR4 = "tree=w1:w0,w2:w0,w3:w0"


# ---------------------------------------------------------------------- planned leave


def test_a_planned_leave_is_decided_by_the_root_and_installed_at_its_step() -> None:
    h = run_table("w0", W4, [
        (1.0, proposal("leave", "w3"), [
            "flood leave w3",
            "connect w1", "connect w2",
            f"flood decision e1 w0,w1,w2 root=w0 {STAR3} T=6",
            "report agreed 1 6",
        ]),
        (1.1, boundary(5), ["trainer waits", "trainer trains"]),
        (1.2, boundary(6), [
            "trainer waits",
            "hear admitted -", "hear installed", "report installed 1 6 False",
            "trainer trains",
        ]),
    ])  # fmt: skip
    assert describe(h.membership.view) == f"e1 w0,w1,w2 root=w0 {STAR3}"


def test_a_decision_taken_after_the_totals_left_the_root_waits_one_more_step() -> None:
    h = run_table("w0", W4, [
        (1.0, proposal("leave", "w3"), [
            "flood leave w3",
            "connect w1", "connect w2",
            f"flood decision e1 w0,w1,w2 root=w0 {STAR3} T=7",
            "report agreed 1 7",
        ]),
    ], down_sent=(0, 5))  # fmt: skip
    assert h.membership.pending is not None


def test_the_leaving_member_forwards_the_decision_on_receipt_and_stops_at_its_step() -> None:
    after = mesh("w0", "w1", "w2").model_copy(update={"epoch": 1})
    h = run_table("w3", W4, [
        (1.0, command("leave"), ["report detected leave w3", "flood leave w3"]),
        (1.0, command("leave"), []),  # once
        (1.2, decision(after, 7), [
            f"flood decision e1 w0,w1,w2 root=w0 {STAR3} T=7",
            "report agreed 1 7",
        ]),
        (1.3, decision(after, 7), []),  # a duplicate is dropped, not flooded again
        (1.4, boundary(6), ["trainer waits", "trainer trains"]),
        (1.5, boundary(7), [
            "trainer waits",
            "hear admitted -", "hear installed", "report installed 1 7 False",
            "trainer stops",
        ]),
    ])  # fmt: skip
    assert "w3" not in h.membership.view.members


# ---------------------------------------------------------------------- crash mid-step


def crash_rows(done: dict[str, int], decided: list[str]) -> list:
    """w2 crashes in step 5; w0 (the coordinator) hears the others' last completed steps."""
    return [
        (2.0, silent("w2"), ["report detected crash w2", "flood crash w2", "hear abort"]),
        (2.0, recovery(), ["flood status w0 done=4"]),
        (2.1, status("w1", done["w1"]), [f"flood status w1 done={done['w1']}"]),
        (2.2, status("w3", done["w3"]), [f"flood status w3 done={done['w3']}", *decided]),
    ]


def test_a_crash_mid_step_is_redone_when_nobody_holds_its_total() -> None:
    h = run_table("w0", W4, crash_rows({"w1": 4, "w3": 4}, [
        "connect w1", "connect w3",
        "flood decision e1 w0,w1,w3 root=w0 tree=w1:w0,w3:w0 T=5",
        "report agreed 1 5",
        "hear installed", "trainer redoes", "report installed 1 5 False",
    ]))  # fmt: skip
    assert not h.membership.aborting and not h.membership.suspects


def test_a_crash_mid_step_is_replayed_from_a_member_that_holds_its_total() -> None:
    # w1 applied step 5 before the abort reached it: it becomes root and sends the total
    h = run_table("w0", W4, crash_rows({"w1": 5, "w3": 4}, [
        "connect w1", "connect w3",
        "flood decision e1 w0,w1,w3 root=w1 tree=w0:w1,w3:w0 T=6 replay=5",
        "report agreed 1 6",
        "hear installed", "trainer replays 5", "report installed 1 6 False",
    ]))  # fmt: skip
    assert h.membership.view.root == "w1"


def reported() -> Event:
    """The trainer's early word: the abort cancelled its all-reduce while its compute of
    the step still runs, so its completed steps can no longer change."""
    return event(lambda h: h.membership.report_status())


def test_the_coordinator_decides_on_the_last_status_while_its_compute_still_runs() -> None:
    """The decision goes out as the last status comes in, not once the coordinator's own
    trainer is back from its compute; `recover` then installs it without a second status."""
    h = run_table("w0", W4, [
        (2.0, silent("w2"), ["report detected crash w2", "flood crash w2", "hear abort"]),
        (2.0, reported(), ["flood status w0 done=4"]),
        (2.1, status("w1", 4), ["flood status w1 done=4"]),
        (2.2, status("w3", 4), [
            "flood status w3 done=4",
            "connect w1", "connect w3",
            "flood decision e1 w0,w1,w3 root=w0 tree=w1:w0,w3:w0 T=5",
            "report agreed 1 5",
        ]),
        (2.3, recovery(), ["hear installed", "trainer redoes", "report installed 1 5 False"]),
    ])  # fmt: skip
    assert not h.membership.aborting and sorted(h.membership.view.members) == ["w0", "w1", "w3"]


def test_a_member_left_out_by_a_recovery_it_holds_decides_none_of_its_own() -> None:
    """w0 was paused: the others removed it in epoch 1. Woken, it holds that decision, and
    their statuses and its own (its trainer's early word) come in: it must not decide a
    second epoch 1 of its own, which would split the job."""
    without = mesh("w1", "w2").model_copy(update={"epoch": 1})
    h = run_table("w0", W3, [
        (1.0, decision(without, 5, immediate=True), None),
        (1.0, reported(), ["flood status w0 done=4"]),
        (1.1, status("w1", 4), ["flood status w1 done=4"]),
        (1.2, status("w2", 4), ["flood status w2 done=4"]),
        (1.3, watch(), []),
    ])  # fmt: skip
    decisions = [line for line in h.out.log if line.startswith("flood decision")]
    assert decisions == ["flood decision e1 w1,w2 root=w1 tree=w2:w1 T=5"]  # theirs, forwarded


def test_a_member_that_never_reports_is_suspected_after_the_failure_timeout() -> None:
    rows = crash_rows({"w1": 4, "w3": 4}, [])[:3]
    h = run_table("w0", W4, [
        *rows,
        (2.0 + FAILURE_TIMEOUT_S, watch(), []),  # not yet: exactly the timeout
        (2.1 + FAILURE_TIMEOUT_S, watch(), [
            "report detected crash w3", "flood crash w3", "hear abort",
            "connect w1",
            "flood decision e1 w0,w1 root=w0 tree=w1:w0 T=5",
            "report agreed 1 5",
            "hear installed", "trainer redoes", "report installed 1 5 False",
        ]),
    ])  # fmt: skip
    assert sorted(h.membership.view.members) == ["w0", "w1"]


def test_a_join_that_arrives_during_a_recovery_waits_for_the_next_planned_decision() -> None:
    rows = crash_rows({"w1": 4, "w3": 4}, [
        "connect w1", "connect w3",
        "flood decision e1 w0,w1,w3 root=w0 tree=w1:w0,w3:w0 T=5",
        "report agreed 1 5",
        "hear installed", "trainer redoes", "report installed 1 5 False",
    ])  # fmt: skip
    h = run_table("w0", W4, [
        rows[0],
        (2.0, proposal("join", "w4", address="h:14"), ["connect w4", "flood join w4"]),
        *rows[1:],
        (2.3, boundary(5), [
            "trainer waits",
            "connect w1", "connect w3", "connect w4",
            "flood decision e2 w0,w1,w3,w4 root=w0 tree=w1:w0,w3:w0,w4:w0 T=6",
            "report agreed 2 6",
            "trainer trains",
        ]),
    ])  # fmt: skip
    assert h.membership.pending.view.joining == ["w4"]


def test_a_planned_decision_that_overtakes_a_late_recovery_is_kept() -> None:
    # w0 coordinates the recovery from w1's crash, installs it, and at once decides a join
    # on top of it; both decisions reach w3 before w3's trainer gets to its recovery
    recovered = mesh("w0", "w2", "w3").model_copy(update={"epoch": 1})
    joined = mesh("w0", "w2", "w3", "w5").model_copy(update={"epoch": 2, "joining": ["w5"]})
    h = run_table("w3", W4, [
        (2.0, silent("w1"), ["report detected crash w1", "flood crash w1", "hear abort"]),
        (2.1, decision(recovered, 5, immediate=True), [
            "connect w0", "connect w2",
            "flood decision e1 w0,w2,w3 root=w0 tree=w2:w0,w3:w0 T=5",
            "report agreed 1 5",
        ]),
        (2.1, decision(joined, 6), [
            "connect w0", "connect w2", "connect w5",
            "flood decision e2 w0,w2,w3,w5 root=w0 tree=w2:w0,w3:w0,w5:w0 T=6",
            "report agreed 2 6",
        ]),
        (2.2, recovery(), [
            "flood status w3 done=4",
            "hear installed", "trainer redoes", "report installed 1 5 False",
        ]),
        (2.3, boundary(5), ["trainer waits", "trainer trains"]),
        (2.4, boundary(6), [
            "trainer waits",
            "hear admitted w5 +state", "hear installed", "report installed 2 6 False",
            "trainer trains",
        ]),
    ])  # fmt: skip
    assert h.membership.view.epoch == 2


# ---------------------------------------------------------------------- links down


def test_a_link_down_off_the_tree_is_a_planned_change() -> None:
    h = run_table("w0", W3, [
        (1.0, proposal("link_down", "w1", "w2"), [
            "flood link_down w1-w2",
            "connect w1", "connect w2",
            f"flood decision e1 w0,w1,w2 root=w0 {STAR3} down=w1|w2 T=6",
            "report agreed 1 6",
        ]),
        (1.1, boundary(6), [
            "trainer waits",
            "hear admitted -", "hear installed", "report installed 1 6 False",
            "trainer trains",
        ]),
    ])  # fmt: skip
    assert not h.membership.aborting and h.membership.view.down == ["w1|w2"]


def test_a_link_down_on_the_tree_aborts_and_the_tree_is_repaired_around_it() -> None:
    h = run_table("w0", W3, [
        (1.0, command("link_down", "w1"), [
            "report detected link_down w0 w1", "flood link_down w0-w1", "hear abort",
        ]),
        (1.0, boundary(5), ["trainer waits", "trainer trains"]),  # aborting: back to recover
        (1.0, recovery(), ["flood status w0 done=4"]),
        (1.1, status("w1", 4), ["flood status w1 done=4"]),
        (1.2, status("w2", 4), [
            "flood status w2 done=4",
            "connect w2",
            "flood decision e1 w0,w1,w2 root=w0 tree=w1:w2,w2:w0 down=w0|w1 T=5",
            "report agreed 1 5",
            "hear installed", "trainer redoes", "report installed 1 5 False",
        ]),
    ])  # fmt: skip
    assert h.membership.view.parent["w1"] == "w2"


def test_an_abort_of_the_next_epoch_that_comes_while_recovering_is_not_forgotten() -> None:
    """w1 still recovers from epoch 0 (its compute was slow) when w2, already in epoch 1,
    floods a reset of epoch 1 and its status for that round. Once w1 installs epoch 1 it
    aborts again and reports, and as coordinator (w0 is gone) it decides with w2's status
    kept from before: the others aborted epoch 1 and wait for it."""
    reset = Proposal(
        id="reset:w1|w2:1", origin="w2", kind="reset", subject="w2", peer="w1",
        detected_at=0.0, epoch=1,
    )  # fmt: skip
    ahead = MemberStatus(id="status:w2:1:0", origin="w2", epoch=1, round=0, completed=4)
    h = run_table("w1", W3, [
        (2.0, silent("w0"), ["report detected crash w0", "flood crash w0", "hear abort"]),
        (2.0, reported(), ["flood status w1 done=4"]),
        (2.1, status("w2", 4), None),  # w1 decides epoch 1 and floods it
        (2.2, event(lambda h: h.membership.on_proposal(reset, h.now)), [
            "flood reset w2-w1", "hear abort",
        ]),
        (2.2, event(lambda h: h.membership.on_status(ahead, h.now)), [
            "flood status w2 done=4",
        ]),
        (2.3, recovery(), None),
        (2.4, recovery(), None),  # the trainer, back at the top of its loop, aborting
    ])  # fmt: skip
    log = h.out.log
    assert describe(h.membership.view) == "e2 w1,w2 root=w1 tree=w2:w1"
    again = log[log.index("hear installed") :]  # from epoch 1 on
    assert "hear abort" in again  # the reset of epoch 1 aborts it once in epoch 1
    assert "flood status w1 done=4" in again  # its status for that round
    assert any(line.startswith("flood decision e2") for line in again)  # w2's status kept


# ---------------------------------------------------------------------- partition


CUT = "down=w0|w3,w1|w3,w2|w3"


def test_a_cut_off_minority_pauses_and_rejoins_when_a_link_heals() -> None:
    rejoined = W4.model_copy(update={"epoch": 3, "down": ["w0|w3", "w2|w3"]})
    h = run_table("w3", W4, [
        (1.0, command("link_down", "w0"), [  # on the tree: abort
            "report detected link_down w3 w0", "flood link_down w3-w0", "hear abort",
        ]),
        (1.0, command("link_down", "w1"), [
            "report detected link_down w3 w1", "flood link_down w3-w1",
        ]),
        (1.0, command("link_down", "w2"), [
            "report detected link_down w3 w2", "flood link_down w3-w2",
        ]),
        (1.1, recovery(), [  # alone on its side, w3 coordinates: a minority of 1 in 4
            "flood status w3 done=4",
            f"flood decision e1 w3 root=w3 tree= {CUT} paused T=5",
            "report agreed 1 5",
            "hear installed", "trainer redoes",
            "report installed 1 5 True", "report paused ['w3']",
        ]),
        (1.2, boundary(5), ["trainer waits", "hear rejoin"]),  # paused: asks to come back
        (2.0, command("link_up", "w1"), [  # and again at once when a link heals
            "report detected link_up w3 w1", "flood link_up w3-w1", "hear rejoin",
        ]),
        (2.5, decision(rejoined, 9), [  # the majority admits w3 again
            "connect w1",
            "flood decision e3 w0,w1,w2,w3 root=w0 tree=w1:w0,w2:w0,w3:w0 down=w0|w3,w2|w3 T=9",
            "report agreed 3 9",
        ]),
        (2.6, install_pending(9), [  # the state arrived (the newcomer's part)
            "hear admitted w0,w1,w2", "hear installed", "report installed 3 9 False",
            "trainer trains",
        ]),
    ])  # fmt: skip
    assert not h.membership.view.paused and len(h.membership.view.members) == 4


def test_the_majority_goes_on_without_the_cut_off_member_then_admits_it_again() -> None:
    h = run_table("w0", W4, [
        (1.0, command("link_down", "w3"), [
            "report detected link_down w0 w3", "flood link_down w0-w3", "hear abort",
        ]),
        (1.0, proposal("link_down", "w1", "w3"), ["flood link_down w1-w3"]),
        (1.0, proposal("link_down", "w2", "w3"), ["flood link_down w2-w3"]),
        (1.1, recovery(), ["flood status w0 done=4"]),
        (1.2, status("w1", 4), ["flood status w1 done=4"]),
        (1.3, status("w2", 4), [  # w3 is out of reach: no status is waited for
            "flood status w2 done=4",
            "connect w1", "connect w2",
            f"flood decision e1 w0,w1,w2 root=w0 {STAR3} {CUT} T=5",
            "report agreed 1 5",
            "hear installed", "trainer redoes", "report installed 1 5 False",
        ]),
        (1.4, boundary(5), ["trainer waits", "trainer trains"]),
        (2.0, proposal("link_up", "w3", "w1"), [
            "flood link_up w3-w1",
            "connect w1", "connect w2",
            f"flood decision e2 w0,w1,w2 root=w0 {STAR3} down=w0|w3,w2|w3 T=6",
            "report agreed 2 6",
        ]),
        (2.0, proposal("join", "w3", address="h:13"), ["connect w3", "flood join w3"]),
        (2.1, boundary(6), [  # the link first, then the rejoin: one decision at a time
            "trainer waits",
            "hear admitted -", "hear installed", "report installed 2 6 False",
            "connect w1", "connect w2",
            "flood decision e3 w0,w1,w2,w3 root=w0 tree=w1:w0,w2:w0,w3:w1 down=w0|w3,w2|w3 T=7",
            "report agreed 3 7",
            "trainer trains",
        ]),
    ])  # fmt: skip
    assert h.membership.pending is not None and "w3" in h.membership.pending.view.joining


# ---------------------------------------------------------------------- joins


def test_two_joins_that_arrive_while_a_decision_is_pending_are_decided_together() -> None:
    h = run_table("w0", W3, [
        (1.0, proposal("leave", "w2"), [
            "flood leave w2",
            "connect w1",
            "flood decision e1 w0,w1 root=w0 tree=w1:w0 T=6",
            "report agreed 1 6",
        ]),
        (1.1, proposal("join", "w3", address="h:13"), ["connect w3", "flood join w3"]),
        (1.2, proposal("join", "w4", address="h:14"), ["connect w4", "flood join w4"]),
        (1.3, boundary(6), [
            "trainer waits",
            "hear admitted -", "hear installed", "report installed 1 6 False",
            "connect w1", "connect w3", "connect w4",
            "flood decision e2 w0,w1,w3,w4 root=w0 tree=w1:w0,w3:w0,w4:w0 T=7",
            "report agreed 2 7",
            "trainer trains",
        ]),
        (1.4, boundary(7), [
            "trainer waits",
            "hear admitted w3,w4 +state", "hear installed", "report installed 2 7 False",
            "trainer trains",
        ]),
    ])  # fmt: skip
    assert h.membership.view.joining == ["w3", "w4"]


def test_a_newcomer_hears_decisions_before_it_holds_a_view() -> None:
    async def main() -> Harness:
        h = Harness("w3", W3)
        h.membership.view = None  # not a member yet
        admitted = W4.model_copy(update={"epoch": 1, "joining": ["w3"]})
        await h.play([
            (1.0, proposal("leave", "w2"), ["flood leave w2"]),  # nothing to decide on
            (1.1, decision(admitted, 7), [
                "connect w0", "connect w1", "connect w2",
                f"flood decision e1 w0,w1,w2,w3 root=w0 {STAR4} T=7",
                "report agreed 1 7",
                f"hear joining decision e1 w0,w1,w2,w3 root=w0 {STAR4} T=7",
            ]),
        ])  # fmt: skip
        return h

    h = asyncio.run(main())
    assert h.membership.view is None and h.membership.pending is not None
