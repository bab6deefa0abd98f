"""`chaos bench pull`: one snapshot from real replicator processes over shaped loopback."""

from __future__ import annotations

import json

import pytest
from chaos_cli.main import main

pytestmark = pytest.mark.cluster


def test_bench_pull_fetches_the_whole_state_from_every_neighbour(capsys) -> None:
    argv = ["bench", "pull", "--sizes", "2", "--neighbours", "2", "--profiles", "heterogeneous"]
    assert main(argv) == 0
    result = json.loads(capsys.readouterr().out)
    (run,) = result["runs"]
    assert (run["state_mb"], run["neighbours"]) == (2, 2)
    assert run["bandwidths_bytes_per_s"] == [25e6, 50e6]
    got = run["bytes_per_source"]
    assert set(got) == {"w0", "w1"} and all(n > 0 for n in got.values())
    assert sum(got.values()) >= 2_000_000  # the table, and a little model
    assert run["limit_s"] == pytest.approx(sum(got.values()) / 75e6, abs=1e-4)  # rounded
    assert run["pull_s"] > 0 and run["ratio"] > 0


def test_bench_pull_rejects_an_unknown_profile(capsys) -> None:
    assert main(["bench", "pull", "--profiles", "fast"]) == 2
    assert "--profiles: unknown ['fast']" in capsys.readouterr().err
