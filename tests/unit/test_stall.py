"""A worker's incumbent-stall figure: the run report's definition on its own steps."""

from __future__ import annotations

import pytest
from chaos_worker.telemetry.stall import StallMeter, lost_time

pytestmark = pytest.mark.unit


def _steps(meter: StallMeter, start: float, gaps: list[float]) -> tuple[float, list]:
    t, out = start, []
    for gap in gaps:
        t += gap
        out.append(meter.step_done(t))
    return t, out


def test_a_change_that_slows_steps_reports_their_excess_once() -> None:
    meter = StallMeter(window=3)
    t, results = _steps(meter, 0.0, [0.1] * 10)
    assert results == [None] * 10
    meter.change_started()
    t, results = _steps(meter, t, [0.1, 0.4])  # waiting for the change
    meter.change_installed()
    t, results = _steps(meter, t, [0.3, 0.1, 0.1])
    assert results[:2] == [None, None]
    assert results[2] == pytest.approx((0.4 - 0.1) + (0.3 - 0.1))
    _, results = _steps(meter, t, [0.1] * 5)
    assert results == [None] * 5


def test_jitter_alone_is_no_stall() -> None:
    meter = StallMeter(window=2)
    t, _ = _steps(meter, 0.0, [0.1, 0.12, 0.08, 0.1, 0.1])
    meter.change_started()
    meter.change_installed()
    _, results = _steps(meter, t, [0.08, 0.12])
    assert results[-1] == 0.0


def test_a_newcomer_without_typical_steps_reports_nothing() -> None:
    meter = StallMeter(window=1)
    meter.change_started()
    meter.change_installed()
    _, results = _steps(meter, 0.0, [5.0, 0.1])
    assert results == [None, None]


def test_the_report_uses_the_same_definition() -> None:
    assert lost_time([0.4, 0.3, 0.1], 0.1) == pytest.approx(0.5)
    assert lost_time([0.05, 0.1], 0.1) == 0.0
