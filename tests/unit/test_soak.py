"""`chaos soak`'s pure parts: the loss comparison, the stall diagnosis, the per-round
lines and totals, and bad input (one line, exit 2, before anything runs)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from chaos_cli.local import soak
from chaos_cli.local.soak import Round, Soak, SoakSettings, Stalled, check, loss_mismatches
from chaos_cli.local.soakplan import draw_schedule
from chaos_cli.main import main

pytestmark = pytest.mark.unit


def test_losses_agree_to_a_relative_1e_9() -> None:
    reference = {0: 2.0, 1: 1.0, 2: 0.5}
    assert loss_mismatches([(0, 2.0 * (1 + 5e-10)), (1, 1.0), (2, 0.5)], reference) == []
    assert loss_mismatches([(1, 1.0 + 3e-9), (7, 0.1)], reference) == [
        f"step 1: loss {1.0 + 3e-9!r}, the reference's 1.0",
        "step 7: the reference has no such step",
    ]
    assert loss_mismatches([(0, float("nan"))], reference) == [
        "step 0: loss nan, the reference's 2.0"
    ]


def test_a_stall_names_the_view_each_member_is_in() -> None:
    records = [
        {"kind": "installed", "worker": "w1", "epoch": 9, "paused": False},
        {"kind": "installed", "worker": "w0", "epoch": 10, "paused": False},
        {"kind": "installed", "worker": "w1", "epoch": 10, "paused": True},
        {"kind": "progress", "worker": "w2", "step": 3},
    ]
    assert soak.views_in_force(records) == "w0 e10, w1 e10 paused"
    assert soak.views_in_force([]) == "none installed"


def test_no_new_step_for_the_stall_time_stops_the_round(monkeypatch) -> None:
    now = [100.0]
    monkeypatch.setattr(soak.time, "monotonic", lambda: now[0])
    watching = soak._Progress()
    monkeypatch.setattr(watching.watch, "tick", lambda pids: None)
    run = SimpleNamespace(max_step=-1, procs={}, timeline=SimpleNamespace(records=[]))
    now[0] += soak.STALL_S * 2
    watching(run)  # start-up: no step yet, not a stall
    run.max_step = 4
    watching(run)
    now[0] += soak.STALL_S - 1
    watching(run)
    now[0] += 2
    with pytest.raises(Stalled, match=r"no step completed for 60 s after step 4"):
        watching(run)


def _round(index: int, **checks: list[str]) -> Round:
    result = Round(index, draw_schedule(0, index, 6, 300), steps=300, samples=300 * 64)
    result.checks = {name: check(problems) for name, problems in checks.items()}
    return result


def test_lines_failures_and_totals(tmp_path) -> None:
    run = Soak(SoakSettings(steps=300, report=tmp_path / "r.json"), lambda churn: None)
    run.rounds = [
        _round(0, steps=[], samples=[], losses=[], verdict=[], leaks=[]),
        _round(1, steps=["step 7 never completed", "step 8 never completed"], leaks=[]),
    ]
    assert run.line(run.rounds[0]).startswith("round 0: 300 steps, crash 1, cut 1, join 1")
    assert run.line(run.rounds[0]).split("; ")[1].startswith("checks ok")
    assert "FAILED: steps" in run.line(run.rounds[1])
    assert run.failures() == ["round 1 steps: step 7 never completed (and 1 more)"]
    totals = run.totals()
    assert totals["rounds"] == 2 and totals["rounds_passed"] == 1
    assert totals["events"]["crash"] == 1 and totals["events"]["hang"] == 1
    assert totals["events"]["pause"] == 2 and totals["steps"] == 600
    written = run.write().read_text()
    assert '"passed": false' in written and '"schedule": "' in written


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--duration", "0"], "--duration must be a positive, finite number"),
        (["--duration", "inf"], "--duration must be a positive, finite number"),
        (["--workers-per-party", "0"], "--workers-per-party must lie in 2..10"),
        (["--workers-per-party", "11"], "--workers-per-party must lie in 2..10"),
        (["--steps-per-round", "299"], "--steps-per-round must be at least 300"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(args: list[str], message: str, capsys) -> None:
    assert main(["soak", *args]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err
