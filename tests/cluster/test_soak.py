"""`chaos soak` end to end: a short soak (the reference run and one round of every kind of
churn on a three-party job) passes every check and leaves nothing behind."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.cluster.test_run import leftover_workers

pytestmark = pytest.mark.cluster


def test_a_short_soak_passes_every_check(tmp_path: Path) -> None:
    report = tmp_path / "soak.json"
    command = [sys.executable, "-m", "chaos_cli.main", "soak", "--report", str(report)]
    result = subprocess.run(
        [*command, "--duration", "60", "--steps-per-round", "300"],
        cwd=tmp_path,
        env={**os.environ, "TMPDIR": str(tmp_path)},  # its runs' directories: only its own
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, result.stderr + result.stdout
    body = json.loads(report.read_text())
    totals = body["totals"]
    assert totals["rounds"] >= 1 and totals["rounds_passed"] == totals["rounds"]
    assert totals["steps"] == 300 * totals["rounds"]
    assert totals["samples_accounted"] + totals["samples_inferred"] == 64 * totals["steps"]
    assert totals["events"]["pause"] >= 1 and totals["events"]["crash"] >= 1
    assert totals["failed_checks"] == []
    for round_ in body["rounds"]:
        assert set(round_["checks"]) == {"steps", "samples", "losses", "verdict", "leaks"}
        assert round_["checks"]["leaks"]["worker_processes"] >= 6
    assert leftover_workers(tmp_path) == []
    assert "round 0: 300 steps" in result.stdout
