"""Durable checkpoints end to end: real worker processes, real float64 training.

A run whose every member is killed resumes from its newest checkpoint and follows the
uninterrupted trajectory; a damaged newest checkpoint is refused and the one before used;
exported weights load into the factory's model and give the run's losses."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.cluster.test_run import assert_same_losses, chaos, in_tmp, leftover_workers, run_job

pytestmark = pytest.mark.cluster

STEPS = 200
EVERY = 20
JOB = ("--steps", str(STEPS), "--dtype", "float64", "--churn", "none")
ENTRY = "chaos_worker.examples.digits:factory"


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> tuple[dict, Path]:
    """The uninterrupted run, writing checkpoints: its report and its checkpoint directory."""
    tmp = tmp_path_factory.mktemp("reference")
    folder = tmp / "ck"
    report = run_job(
        tmp, "reference", "--workers", "3", *JOB, "--checkpoint-dir", str(folder),
        "--checkpoint-every", str(EVERY),
    )  # fmt: skip
    return report, folder


def _curve_from(report: dict, start: int) -> list:
    return [point for point in report["loss_curve"] if point[0] >= start]


def test_the_reference_run_keeps_its_newest_checkpoints_and_the_final_state(reference):
    report, folder = reference
    assert report["steps"] == STEPS and not report["problems"]
    section = report["checkpoints"]
    assert section["resumed_from"] is None
    assert sorted(p.name for p in folder.iterdir()) == [
        "step-00000160", "step-00000180", "step-00000200",
    ]  # fmt: skip
    assert section["final"] == str(folder / "step-00000200")
    steps = [w["step"] for w in section["written"]]
    assert steps == sorted(steps) and steps[-1] == STEPS and len(set(steps)) == len(steps)
    assert len({w["worker"] for w in section["written"]}) == 1  # one writer, the root


def test_a_run_whose_members_are_all_killed_resumes_on_the_same_trajectory(reference, tmp_path):
    """The whole run is SIGKILLed once its checkpoint of step 20 is complete: the launcher,
    and with it (PR_SET_PDEATHSIG) every worker at once, wherever it was, maybe mid-write
    of the next checkpoint. A second run with --resume goes on from the newest checkpoint."""
    folder = tmp_path / "ck"
    killed = subprocess.Popen(
        [sys.executable, "-m", "chaos_cli.main", "run", "--quiet", "--report",
         str(tmp_path / "killed.json"), "--workers", "3", *JOB, "--checkpoint-dir",
         str(folder), "--checkpoint-every", str(EVERY)],
        cwd=tmp_path, env={**os.environ, **in_tmp(tmp_path)},
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 240
        while not (folder / "step-00000020" / "manifest.json").exists():
            assert killed.poll() is None, "the run ended before it could be killed"
            assert time.monotonic() < deadline, "no checkpoint of step 20"
            time.sleep(0.005)
    finally:
        killed.send_signal(signal.SIGKILL)
        killed.wait()
    for _ in range(500):
        if not leftover_workers(tmp_path):
            break
        time.sleep(0.02)
    assert leftover_workers(tmp_path) == [], "a member outlived the kill"
    assert not (tmp_path / "killed.json").exists()  # it never finished

    resumed = run_job(tmp_path, "resumed", "--workers", "2", *JOB, "--resume", str(folder))
    start = resumed["checkpoints"]["resumed_step"]
    assert start is not None and EVERY <= start < STEPS
    assert resumed["checkpoints"]["resumed_from"] == str(folder / f"step-{start:08d}")
    assert [s for s, _ in resumed["loss_curve"]] == list(range(start, STEPS)), "a step was lost"
    assert_same_losses(resumed["loss_curve"], _curve_from(reference[0], start))
    assert not resumed["problems"]
    assert resumed["checkpoints"]["final"] == str(folder / f"step-{STEPS:08d}")


def _flip_a_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x40
    path.write_bytes(bytes(data))


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


@pytest.mark.parametrize(
    ("damage", "why"),
    [(_truncate, "bytes, the manifest says"), (_flip_a_byte, "SHA-256 differs")],
)
def test_a_damaged_newest_checkpoint_is_refused_and_the_one_before_used(
    reference, tmp_path, damage, why
):
    folder = tmp_path / "ck"
    shutil.copytree(reference[1], folder)
    newest = folder / f"step-{STEPS:08d}"
    damage(newest / "state.safetensors")
    report = tmp_path / "resumed.json"
    result = chaos(
        "run", "--quiet", "--report", str(report), "--workers", "2", *JOB, "--resume",
        str(folder), cwd=tmp_path, env=in_tmp(tmp_path),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    (line,) = [ln for ln in result.stderr.splitlines() if "skipping" in ln]
    assert f"skipping checkpoint {newest}: state.safetensors" in line and why in line, line
    resumed = json.loads(report.read_text())
    start = STEPS - EVERY
    assert resumed["checkpoints"]["resumed_step"] == start
    assert [s for s, _ in resumed["loss_curve"]] == list(range(start, STEPS))
    assert_same_losses(resumed["loss_curve"], _curve_from(reference[0], start))


def _spec():
    from chaos_worker.training.trainspec import load_trainspec

    return load_trainspec(ENTRY, seed=0, dtype=torch.float64, device=torch.device("cpu"))


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_exported_weights_load_into_the_model_and_give_the_runs_loss(reference, tmp_path, suffix):
    """The weights after step s-1 (checkpoint s) compute step s's reported loss again."""
    from chaos_worker.training.sampling import step_sample_ids

    report, folder = reference
    step = STEPS - 2 * EVERY
    out = tmp_path / f"model{suffix}"
    result = chaos("export", str(folder / f"step-{step:08d}"), "--out", str(out), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    if suffix == ".pt":
        weights = torch.load(out, weights_only=True)
    else:
        from safetensors.torch import load_file

        weights = load_file(out)
    spec = _spec()
    spec.model.load_state_dict(weights)  # strict: every key, nothing else
    ids = step_sample_ids(0, step, 64, len(spec.dataset))
    inputs, targets = zip(*(spec.dataset[i] for i in ids), strict=True)
    spec.model.train()
    with torch.no_grad():
        loss = spec.loss_fn(spec.model(torch.stack(inputs)), torch.stack(targets)).sum() / 64
    assert_same_losses([(step, float(loss))], [report["loss_curve"][step]])


def test_the_final_checkpoint_is_the_state_every_member_ended_on(reference):
    from chaos_worker.replication.checkpoint import load_checkpoint
    from chaos_worker.replication.snapshot import state_digest

    report, _ = reference
    spec = _spec()
    manifest = load_checkpoint(
        Path(report["checkpoints"]["final"]), spec.model, spec.optimizer,
        torch.device("cpu"), 1 << 30,
    )  # fmt: skip
    assert manifest.final and manifest.step == STEPS
    digests = {p["state_sha256"] for p in report["processes"]}
    assert digests == {state_digest(spec.model, spec.optimizer)}


def test_export_refuses_bad_input_with_one_line(reference, tmp_path):
    damaged = tmp_path / "damaged"
    shutil.copytree(reference[1] / f"step-{STEPS:08d}", damaged)
    _flip_a_byte(damaged / "state.safetensors")
    (tmp_path / "empty").mkdir()
    good = str(reference[1])
    for args, needle in [
        ([str(tmp_path / "nope"), "--out", "m.pt"], "does not exist"),
        ([str(tmp_path / "empty"), "--out", "m.pt"], "holds no checkpoint"),
        ([str(damaged), "--out", "m.pt"], "SHA-256 differs"),
        ([good, "--out", "/proc/no-such-dir/m.pt"], "cannot write"),
        ([good, "--out", "m.bin"], "*.safetensors or *.pt"),
    ]:
        result = chaos("export", *args, cwd=tmp_path)
        assert result.returncode == 2, result.stderr
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and needle in lines[0], result.stderr
    assert not list(tmp_path.glob("*.pt"))


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--resume", "nope"], "--resume: nope does not exist"),
        (["--resume", "REF"], "holds float64 state; give --dtype"),
        (["--resume", "REF", "--dtype", "float64", "--steps", "100"], "leaves nothing to train"),
        (["--resume", "REF", "--dtype", "float64", "--seed", "3"], "trained with seed 0"),
        (["--checkpoint-keep", "0"], "--checkpoint-keep must be at least 1"),
        (["--checkpoint-every-s", "nan"], "--checkpoint-every-s must be a positive"),
        (["--checkpoint-dir", "/proc/no-such-dir"], "--checkpoint-dir /proc/no-such-dir"),
    ],
)
def test_bad_checkpoint_options_are_one_line(reference, tmp_path, args, needle):
    args = [str(reference[1]) if a == "REF" else a for a in args]
    result = chaos("run", "--quiet", "--churn", "none", *args, cwd=tmp_path, env=in_tmp(tmp_path))
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], result.stderr
    assert leftover_workers(tmp_path) == []
