"""Run report: JSON round trip and PNG plot."""

from __future__ import annotations

import struct

import pytest
from chaos_cli.local.report import Report, RunEvent, plot_report, read_report, write_report
from pydantic import ValidationError

pytestmark = pytest.mark.unit


def sample_report() -> Report:
    events = [
        RunEvent(
            type="join",
            worker="w3",
            step=20,
            handling_ms=12.5,
            incumbent_stall_s=0.01,
            steps_lost=0,
            scale_out_delay_s=1.4,
        ),
        RunEvent(
            type="crash",
            worker="w1",
            step=45,
            handling_ms=230.0,
            incumbent_stall_s=0.6,
            steps_lost=1,
            detail="SIGKILL",
        ),
        RunEvent(
            type="partition",
            worker="w2",
            step=70,
            handling_ms=80.0,
            incumbent_stall_s=0.2,
            steps_lost=0,
        ),
    ]
    members = [(0, 2), (20, 3), (45, 2), (70, 2)]
    return Report(
        steps=100,
        global_batch=64,
        final_loss=0.31,
        loss_curve=[(t, 2.3 * 0.98**t) for t in range(100)],
        events=events,
        members_curve=members,
        samples_per_s=1520.0,
        example="digits",
        workers=3,
        dtype="float64",
    )


def test_json_round_trips(tmp_path) -> None:
    report = sample_report()
    path = write_report(report, tmp_path / "report.json")
    text = path.read_text()
    assert text.startswith("{\n  ")
    assert read_report(path) == report
    assert Report.model_validate_json(text).loss_curve[1] == (1, 2.3 * 0.98)


def test_defaults_and_validation() -> None:
    minimal = Report(steps=0, global_batch=8, final_loss=0.0, loss_curve=[], events=[])
    assert minimal.members_curve == [] and minimal.samples_per_s is None
    with pytest.raises(ValidationError):
        RunEvent(
            type="explode", worker="w", step=0, handling_ms=0, incumbent_stall_s=0, steps_lost=0
        )


def png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def test_plot_writes_a_plausible_png(tmp_path) -> None:
    path = plot_report(sample_report(), tmp_path / "report.png")
    data = path.read_bytes()
    width, height = png_size(data)
    assert (width, height) == (1200, 720)
    assert 20_000 < len(data) < 2_000_000
    assert data.endswith(b"IEND\xaeB`\x82")


def test_plot_handles_an_empty_report(tmp_path) -> None:
    empty = Report(steps=0, global_batch=8, final_loss=0.0, loss_curve=[], events=[])
    assert png_size(plot_report(empty, tmp_path / "empty.png").read_bytes()) == (1200, 720)
