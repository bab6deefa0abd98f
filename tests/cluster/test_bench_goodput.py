"""`chaos bench goodput`: a Chaos run under churn, churn-free DDP and the torchrun-style
model, at a tiny size; the JSON's shape and sane values, no timing asserted."""

from __future__ import annotations

import json

import pytest
from chaos_cli.benches.goodput import FORMULA, TARGET, RestartParts, torchrun_seconds
from chaos_cli.main import main

pytestmark = pytest.mark.cluster


def test_bench_goodput_measures_both_sides_and_models_the_restarts(capsys) -> None:
    argv = ["bench", "goodput", "--size", "20K", "--workers", "2", "--steps", "80"]
    argv += ["--every", "20", "--checkpoint-every", "10", "--warmup", "2"]
    assert main(argv) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["model"] == FORMULA
    assert result["job"]["example"] == "mlp-20K"
    assert (result["steps"], result["every"], result["checkpoint_every"]) == (80, 20, 10)
    assert result["schedule"] == "leave:w1@20,join@40,crash:w2@60"
    assert result["events"] == 3
    assert result["target"] == TARGET
    chaos, ddp, parts = result["chaos"], result["ddp"], result["parts"]
    assert chaos["problems"] == []
    assert [e["type"] for e in chaos["events"]] == ["leave", "join", "crash"]
    assert 1 <= chaos["mean_members"] <= 2
    assert set(chaos["step_s_by_members"]) <= {"1", "2"}
    assert all(step_s > 0 for step_s in chaos["step_s_by_members"].values())
    for side in (chaos, ddp):
        assert side["measured_steps"] == 77  # steps 2..79
        assert side["seconds"] > 0 and side["step_s"] > 0
    for name in ("chaos", "ddp", "torchrun"):
        assert result[f"{name}_samples_per_s"] > 0
    ddp_rate = result["ddp_samples_per_s"]
    for name in ("chaos", "torchrun"):  # ratios rounded to 4 decimals
        rate = result[f"{name}_samples_per_s"]
        assert result[f"{name}_over_ddp"] == pytest.approx(rate / ddp_rate, abs=1e-4)
    assert result["met"] is (result["chaos_over_ddp"] >= TARGET)
    assert parts["start_s"] > 0 and parts["rendezvous_s"] > 0
    assert parts["checkpoint_save_s"] > 0 and parts["checkpoint_load_s"] > 0
    assert parts["checkpoint_bytes"] > 3 * 4 * 19_000  # parameters and both Adam moments
    modelled = torchrun_seconds(
        steps=77,
        step_s=64 / ddp_rate,
        events=3,
        checkpoint_every=10,
        parts=RestartParts(
            parts["start_s"],
            parts["rendezvous_s"],
            parts["checkpoint_save_s"],
            parts["checkpoint_load_s"],
        ),
    )
    assert result["torchrun"]["seconds"] == pytest.approx(modelled, rel=1e-2)
    assert result["torchrun_over_ddp"] < 1  # every term the model adds is a cost
    matched, short = result["matched"], result["matched"]["ddp_short"]
    assert short["ranks"] == 1 and short["measured_steps"] == 77 and short["samples_per_s"] > 0
    # DDP at Chaos's membership: between one-rank and two-rank DDP's rates
    low, high = sorted((ddp_rate, short["samples_per_s"]))
    assert low * 0.999 <= matched["ddp_samples_per_s"] <= high * 1.001
    assert matched["capacity"] == pytest.approx(matched["ddp_samples_per_s"] / ddp_rate, abs=1e-3)
    chaos_rate = result["chaos_samples_per_s"]
    assert matched["chaos_over_ddp"] == pytest.approx(
        chaos_rate / matched["ddp_samples_per_s"], abs=1e-3
    )
    assert matched["met"] is (matched["chaos_over_ddp"] >= TARGET)
    assert matched["torchrun_over_ddp"] < 1


@pytest.mark.parametrize(
    ("extra", "option"),
    [
        (["--workers", "1"], "--workers"),
        (["--every", "300"], "--every"),
        (["--warmup", "100"], "--warmup"),
        (["--size", "big"], "--size"),
        (["--example", "nosuch"], "--example"),
    ],
)
def test_bench_goodput_refuses_bad_input(capsys, extra: list[str], option: str) -> None:
    assert main(["bench", "goodput", *extra]) == 2
    assert option in capsys.readouterr().err
