"""`chaos bench throughput`: DDP and a local Chaos job train the same model; the JSON's shape."""

from __future__ import annotations

import json

import pytest
from chaos_cli.main import main

pytestmark = pytest.mark.cluster


def test_bench_throughput_trains_both_sides_the_same_steps(capsys) -> None:
    argv = ["bench", "throughput", "--sizes", "20K", "--examples", ""]
    # enough steps after warm-up for the CPU figures (read in 1/100 s ticks) to move
    argv += ["--steps", "40", "--warmup", "2", "--workers", "2", "--bucket-mb", "0.25"]
    assert main(argv) == 0
    result = json.loads(capsys.readouterr().out)
    assert (result["workers"], result["global_batch"], result["steps"]) == (2, 64, 40)
    assert result["tls"] is True
    assert result["bucket_bytes"] == 1 << 18
    (model,) = result["models"]
    assert model["model"] == "mlp-20K"
    assert 15_000 < model["params"] < 25_000
    for side in ("ddp", "chaos"):
        assert model[side]["steps"] == [40]
        assert model[side]["step_s"] > 0
        assert model[side]["runs_step_s"] == [model[side]["step_s"]]
    assert model["chaos"]["compute_s"] > 0
    assert model["chaos"]["cpu_s"] > 0 and model["ddp"]["cpu_s"] > 0
    assert model["cpu_ratio"] > 0
    assert model["ratio"] == pytest.approx(model["chaos"]["step_s"] / model["ddp"]["step_s"], 0.01)
    assert model["ratios_by_round"] == [pytest.approx(model["ratio"], abs=0.001)]


def test_bench_throughput_refuses_bad_input(capsys) -> None:
    assert main(["bench", "throughput", "--sizes", "big", "--examples", ""]) == 2
    assert "--sizes" in capsys.readouterr().err
    assert main(["bench", "throughput", "--sizes", "", "--examples", "nosuch"]) == 2
    assert "--examples" in capsys.readouterr().err


def test_bench_helpers_are_not_benches(capsys) -> None:
    with pytest.raises(SystemExit):
        main(["bench", "_ddp"])
    assert "invalid choice" in capsys.readouterr().err


def test_the_ddp_baseline_returns_every_ranks_stamps_of_a_long_run() -> None:
    """Each rank's result is over 16 KiB here, which `Connection.send` writes in two parts:
    on one pipe shared by the ranks, those parts interleaved and the reader failed to
    unpickle them (`chaos bench throughput --steps 1500`)."""
    from chaos_cli.benches import _ddp
    from chaos_cli.benches._measure import mlp_model, mlp_params

    steps = 1000
    _, entry, size = mlp_model("20K")
    with mlp_params(size):
        result = _ddp.train(entry, workers=2, steps=steps, global_batch=64)
    assert len(result.step_stamps) == len(result.losses) == steps
    assert [len(cpu) for cpu in result.cpu_s] == [steps, steps]
