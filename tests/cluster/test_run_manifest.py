"""`chaos run FILE`: a ChaosJob manifest reconciled into local worker processes.

The "same logic" proof: the bundled manifest, run through the operator's reconcile with a
crash (replaced by a new member), a scale-out and a scale-in, trains exactly the loss curve
of the plain `chaos run` of the same job without churn.
"""

from __future__ import annotations

import asyncio
import os
import tempfile
from dataclasses import replace
from pathlib import Path

import pytest
from chaos_cli.commands.run import options_from
from chaos_cli.local.reconciled import ReconciledJob, base_port_for, load_manifest
from chaos_cli.main import build_parser

from tests.cluster.test_run import (
    assert_same_losses,
    chaos,
    in_tmp,
    leftover_workers,
    stopped_at,
)

pytestmark = pytest.mark.cluster

REPO = Path(__file__).resolve().parents[2]
MANIFEST = REPO / "examples" / "chaosjob.yaml"
CHURN = "crash:w1@12,leave:w2@20,join@24"
LONG = 1_000_000
"""Steps of a run that ends once its newcomers trained (`stop_after_join_steps`), not at a
step: the trainers do not wait for a join, so no fixed number of steps leaves a loaded
machine time to finish one."""


def test_the_manifest_trains_like_the_plain_run_through_churn(tmp_path, monkeypatch):
    monkeypatch.setenv("TMPDIR", str(tmp_path))  # the run's directory, for leftover_workers
    monkeypatch.setattr(tempfile, "tempdir", None)
    job = load_manifest(str(MANIFEST))
    # No downlink probe before a join: it lasts a wall-clock time, dozens of steps of this
    # fast job on a quiet machine, and the join at step 24 could then outlast the leave.
    args = build_parser().parse_args([
        "run", str(MANIFEST), "--steps", str(LONG), "--dtype", "float64",
        "--churn", CHURN, "--join-probe-frames", "0",
    ])  # fmt: skip
    options = replace(options_from(args, job), stop_after_join_steps=10)
    run = ReconciledJob(job, options, base_port=base_port_for(options))
    report = asyncio.run(run.run()).model_dump()
    done = report["steps"]
    assert report["problems"] == [f"only {done} of {LONG} steps completed"]
    # the plain run of the same job (no manifest, no churn), stopped at the same step
    plain = stopped_at(replace(options, churn=[], stop_after_join_steps=None), done)
    assert [s for s, _ in report["loss_curve"]] == list(range(done)), "a step was lost"
    assert_same_losses(report["loss_curve"], plain["loss_curve"][:done])
    # The crash of w1 made the reconcile create a replacement (w3) that joined through a live
    # member; leave:w2 deleted w2's pod and scaled in; join@24 scaled out (w4). The
    # replacement's join and the leave may come in either order.
    events = sorted((e["type"], e["worker"]) for e in report["events"])
    assert events == [
        ("crash", "digits-w1"),
        ("join", "digits-w3"),
        ("join", "digits-w4"),
        ("leave", "digits-w2"),
    ]
    assert all(e["steps_lost"] == 0 for e in report["events"])
    assert {j["worker"] for j in report["joins"]} == {"digits-w3", "digits-w4"}
    assert report["members_curve"][-1][1] == 3
    assert not [p for p in report["processes"] if Path(f"/proc/{p['pid']}").exists()]
    assert leftover_workers(tmp_path) == []
    assert not list(tmp_path.glob("chaos-run-*")), "the run directory was left behind"


def _manifest(tmp_path: Path, old: str, new: str) -> str:
    path = tmp_path / "job.yaml"
    text = MANIFEST.read_text()
    assert old in text
    path.write_text(text.replace(old, new))
    return str(path)


@pytest.mark.parametrize(
    ("edit", "args", "needle"),
    [
        (("replicas: 3", "replicas: 9"), [], "replicas must lie within"),
        (("globalBatch: 64", "globalBatch: 0"), [], "spec.globalBatch"),
        (("  seed: 0", "  sed: 0"), [], "spec.sed: is not a known field"),
        (("kind: ChaosJob", "kind: ChaosPeer"), [], "kind"),
        (("name: digits", "name: Digits_1"), [], "metadata.name"),
        (("replicas: 3", "replicas: [3"), [], "not valid YAML"),
        (("digits:factory", "no_such_module_xyz:factory"), [], "spec.entry"),
        (("globalBatch: 64", 'globalBatch: "64"'), [], "spec.globalBatch: must be a valid integer"),
        (("replicas: 3", "replicas: true"), [], "spec.replicas: must be a valid integer"),
        (("replicas: 3", "replicas: 3\n  replicas: 4"), [], "(line 15): duplicate key 'replicas'"),
        (("seed: 0", f"seed: {2**70}\n  x: {'[' * 20_000}{']' * 20_000}"), [], "nested too deeply"),
        (("seed: 0", f"seed: {2**70}"), [], "spec.seed: must be less than or equal"),
        (("name: digits", "name: digits\n  x: &a [*a]"), [], "aliases are expanded"),
        (("seed: 0", "seed: 0\n#" + "x" * (1 << 20)), [], "larger than 1 MiB"),
        (("seed: 0", "seed: !!int zero"), [], "not valid YAML: ValueError"),
        (("globalBatch: 64", "globalBatch: 99999999"), [], "spec.globalBatch: must lie in 1.."),
        (("s: 3\n  minReplicas: 1\n  maxReplicas: 5", "s: 99\n  maxReplicas: 99"), [], "1..64"),
        (("seed: 0", "seed: 0\n  bucketKiB: 0"), [], "spec.bucketKiB"),
        (("seed: 0", "seed: 0\n  bucketKiB: 64"), ["--bucket-mb", "1"], "sets spec.bucketKiB"),
        (("seed: 0", "seed: 0\n  microBatch: 0"), [], "spec.microBatch"),
        (("seed: 0", "seed: 0\n  microBatch: 8"), ["--micro-batch", "4"], "sets spec.microBatch"),
        (None, ["--workers", "3"], "--workers"),
        (None, ["--churn", "join@2,join@3,join@4"], "maxReplicas"),
        (None, ["--churn", "join:w7@2"], "join@2"),
    ],
)
def test_a_bad_manifest_is_one_line_and_starts_nothing(tmp_path, edit, args, needle):
    path = _manifest(tmp_path, *edit) if edit else str(MANIFEST)
    result = chaos(
        "run", "--quiet", "--steps", "10", path, *args, cwd=tmp_path, env=in_tmp(tmp_path)
    )
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], result.stderr
    assert "Traceback" not in result.stderr
    assert leftover_workers(tmp_path) == []
    assert not (tmp_path / "chaos-report.json").exists()
    assert not list(tmp_path.glob("chaos-run-*")), "the run directory was left behind"


def test_the_manifests_bucket_and_micro_batch_reach_the_run(tmp_path):
    path = _manifest(tmp_path, "seed: 0", "seed: 0\n  bucketKiB: 256\n  microBatch: 8")
    options = options_from(build_parser().parse_args(["run", path]), load_manifest(path))
    assert (options.bucket_bytes, options.micro_batch) == (256 * 1024, 8)
    # a manifest that sets neither leaves them to the flags
    flags = ["run", str(MANIFEST), "--bucket-mb", "0.5", "--micro-batch", "4"]
    options = options_from(build_parser().parse_args(flags), load_manifest(str(MANIFEST)))
    assert (options.bucket_bytes, options.micro_batch) == (512 * 1024, 4)


def test_a_missing_manifest_is_one_line(tmp_path):
    result = chaos("run", "--quiet", str(tmp_path / "nope.yaml"), cwd=tmp_path)
    assert result.returncode == 2
    assert (
        result.stderr.strip()
        == f"chaos run: error: {tmp_path / 'nope.yaml'}: No such file or directory"
    )


TEMPLATE = """
  template:
    spec:
      containers:
        - name: trainer
          env:
            - name: CHAOS_DATA
              value: /data/samples.txt
          volumeMounts:
            - name: data
              mountPath: /data
      volumes:
        - name: data
          hostPath:
            path: {data}
"""


def test_the_templates_env_and_volumes_reach_the_workers(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    (data / "samples.txt").write_text("digits\n")
    text = (
        MANIFEST.read_text()
        .replace("chaos_worker.examples.digits:factory", "tests.cluster.datafactory:factory")
        .replace("replicas: 3", "replicas: 2")
    )
    path = tmp_path / "job.yaml"
    path.write_text(text.rstrip("\n") + TEMPLATE.format(data=data))
    importable = {"PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    env = {**in_tmp(tmp_path), **importable}  # the factory lives in tests/
    result = chaos("run", "--quiet", "--steps", "10", str(path), cwd=tmp_path, env=env)
    assert result.returncode == 0, result.stderr
    # the entry check and each of the 2 workers read /data/samples.txt: the env's path
    # mapped into the hostPath volume
    marks = sorted(p.read_text() for p in data.glob("seen-*"))
    assert marks == ["digits"] * 3


def test_a_suspended_manifest_starts_nothing(tmp_path):
    path = _manifest(tmp_path, "replicas: 3", "replicas: 3\n  suspend: true")
    result = chaos("run", "--quiet", "--steps", "10", path, cwd=tmp_path, env=in_tmp(tmp_path))
    assert result.returncode == 0, result.stderr
    assert "suspended" in result.stdout
    assert leftover_workers(tmp_path) == []
    assert not (tmp_path / "chaos-report.json").exists()
