"""`chaos plan` and `chaos bench planner`: JSON in, JSON out, one-line errors with exit code 2."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import pytest
from chaos_cli.main import main
from chaos_cli.validation import describe_validation_error, field_path
from chaos_planner import PlanRequest
from pydantic import ValidationError

pytestmark = pytest.mark.unit

PLAN_KEYS = ["solver", "shards", "shard_bytes", "assignment", "makespan_s"]
SOURCE = {"id": "a", "bandwidth_bytes_per_s": 1e6}
GOOD = {
    "state_bytes": 100_000_000,
    "shard_counts": [1, 2, 4],
    "sources": [
        {"id": "a", "bandwidth_bytes_per_s": 100_000_000},
        {"id": "b", "bandwidth_bytes_per_s": 50_000_000},
    ],
}

# (file content, field the single error line must start with)
BAD_INPUTS = {
    "malformed-json": ('{"state_bytes": 1,', "invalid JSON"),
    "5001-digit-integer": (
        '{"state_bytes": ' + "9" * 5001 + "}",
        "invalid JSON: a number too long",
    ),
    "100k-deep": ("[" * 100_000 + "]" * 100_000, "invalid JSON: nested too deeply"),
    "missing-field": (json.dumps({"sources": [SOURCE]}), "state_bytes: is required"),
    "zero-state": (json.dumps({**GOOD, "state_bytes": 0}), "state_bytes: must be greater than 0"),
    "zero-bandwidth": (
        json.dumps({**GOOD, "sources": [SOURCE, {"id": "b", "bandwidth_bytes_per_s": 0}]}),
        "sources[1].bandwidth_bytes_per_s: must be greater than 0",
    ),
    "negative-bandwidth": (
        json.dumps({**GOOD, "sources": [{"id": "b", "bandwidth_bytes_per_s": -3}]}),
        "sources[0].bandwidth_bytes_per_s: must be greater than 0",
    ),
    "not-a-chain": (
        json.dumps({**GOOD, "shard_counts": [1, 2, 5]}),
        "shard_counts: must be a strictly increasing divisibility chain",
    ),
    "caps-too-small": (
        json.dumps({**GOOD, "shard_counts": [4], "sources": [{**SOURCE, "max_shards": 3}]}),
        "sources[*].max_shards:",
    ),
    "not-an-object": ("[1, 2]", "input: must be an object"),
}


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(["plan", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_example_without_arguments(capsys) -> None:
    code, out, err = run_cli(capsys)
    assert (code, err) == (0, "")
    plan = json.loads(out)
    assert list(plan) == PLAN_KEYS
    assert plan["solver"] == "greedy"
    assert sum(plan["assignment"].values()) == plan["shards"]
    assert len(plan["assignment"]) >= 4


@pytest.mark.parametrize("solver", ["greedy", "milp", "single", "equal", "proportional"])
def test_file_and_solvers(capsys, tmp_path: Path, solver: str) -> None:
    path = tmp_path / "request.json"
    path.write_text(json.dumps(GOOD))
    code, out, _ = run_cli(capsys, "--solver", solver, str(path))
    plan = json.loads(out)
    assert code == 0 and plan["solver"] == solver
    if solver in ("greedy", "milp"):
        assert plan == {
            "solver": solver,
            "shards": 4,
            "shard_bytes": 25_000_000.0,
            "assignment": {"a": 3, "b": 1},
            "makespan_s": pytest.approx(0.75),
        }


def test_stdin(capsys, monkeypatch) -> None:
    monkeypatch.setattr(sys, "stdin", io.StringIO(json.dumps(GOOD)))
    code, out, _ = run_cli(capsys, "-")
    assert code == 0 and json.loads(out)["assignment"] == {"a": 3, "b": 1}


@pytest.mark.parametrize(("content", "expected"), BAD_INPUTS.values(), ids=BAD_INPUTS)
def test_bad_input_in_process(capsys, tmp_path: Path, content: str, expected: str) -> None:
    path = tmp_path / "bad.json"
    path.write_text(content)
    code, out, err = run_cli(capsys, str(path))
    assert (code, out) == (2, "")
    assert err.startswith(f"chaos plan: error: {expected}")
    assert err.count("\n") == 1


def test_missing_file(capsys, tmp_path: Path) -> None:
    code, _, err = run_cli(capsys, str(tmp_path / "nope.json"))
    assert code == 2
    assert err == f"chaos plan: error: FILE: {tmp_path / 'nope.json'}: no such file\n"


def chaos(*argv: str, stdin: str = "") -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "chaos_cli.main", *argv],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_subprocess_plan_from_stdin() -> None:
    result = chaos("plan", "-", stdin=json.dumps(GOOD))
    assert (result.returncode, result.stderr) == (0, "")
    plan = json.loads(result.stdout)
    assert list(plan) == PLAN_KEYS and plan["assignment"] == {"a": 3, "b": 1}


def test_subprocess_bad_inputs(tmp_path: Path) -> None:
    cases = [(["-"], content, expected) for content, expected in BAD_INPUTS.values()]
    cases.append(([str(tmp_path / "missing.json")], "", "FILE: "))
    for argv, stdin, expected in cases:
        result = chaos("plan", *argv, stdin=stdin)
        assert result.returncode == 2, result.stderr
        assert result.stdout == ""
        assert result.stderr.startswith(f"chaos plan: error: {expected}")
        assert result.stderr.count("\n") == 1
        assert "Traceback" not in result.stderr


def test_describe_validation_error() -> None:
    assert field_path(("sources", 1, "bandwidth_bytes_per_s")) == "sources[1].bandwidth_bytes_per_s"
    assert field_path((3, "a")) == "[3].a"
    assert field_path(()) == ""
    with pytest.raises(ValidationError) as caught:
        PlanRequest.model_validate(
            {"state_bytes": -1, "sources": [{"id": "a", "bandwidth_bytes_per_s": 1, "x": 2}]}
        )
    assert describe_validation_error(caught.value) == (
        "state_bytes: must be greater than 0 (and 1 more problem)"
    )


def test_bench_planner(capsys) -> None:
    argv = ["bench", "planner", "--sources", "3,12", "--max-shards", "8"]
    code = main([*argv, "--repeats", "2", "--milp-max-sources", "5"])
    result = json.loads(capsys.readouterr().out)
    assert code == 0
    small, large = result["runs"]
    assert (small["sources"], small["max_shards"], large["sources"]) == (3, 8, 12)
    assert small["greedy_ms"] > 0 and small["milp_ms"] > 0 and small["speedup"] > 0
    assert small["milp_makespan_s"] == pytest.approx(small["greedy_makespan_s"], rel=1e-7)
    assert large["milp_ms"] is None and large["speedup"] is None
    assert "--milp-max-sources" in large["milp_skipped"]
