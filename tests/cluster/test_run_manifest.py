"""`chaos run FILE`: a ChaosJob manifest reconciled into local worker processes.

The "same logic" proof: the bundled manifest, run through the operator's reconcile with a
crash (replaced by a new member), a scale-out and a scale-in, trains exactly the loss curve
of the plain `chaos run` of the same job without churn.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.cluster.test_run import assert_same_losses, chaos, in_tmp, leftover_workers, run_job

pytestmark = pytest.mark.cluster

REPO = Path(__file__).resolve().parents[2]
MANIFEST = REPO / "examples" / "chaosjob.yaml"
STEPS = "50"
CHURN = "crash:w1@12,join@24,leave:w2@36"


def test_the_manifest_trains_like_the_plain_run_through_churn(tmp_path):
    common = ("--steps", STEPS, "--dtype", "float64")
    plain = run_job(tmp_path, "plain", "--workers", "3", *common, "--churn", "none")
    # No downlink probe before a join: it lasts a wall-clock time, dozens of steps of this
    # fast job on a quiet machine, and the join at step 24 could then outlast the job.
    job = run_job(tmp_path, "manifest", str(MANIFEST), *common, "--churn", CHURN,
                  "--join-probe-frames", "0",
                  env=in_tmp(tmp_path))  # fmt: skip
    assert job["steps"] == plain["steps"] == 50
    assert [s for s, _ in job["loss_curve"]] == list(range(50)), "a step was lost"
    assert_same_losses(job["loss_curve"], plain["loss_curve"])
    # The crash of w1 made the reconcile create a replacement (w3) that joined through a live
    # member; join@24 scaled out (w4); leave:w2 deleted w2's pod and scaled in.
    events = [(e["type"], e["worker"]) for e in job["events"]]
    assert events == [
        ("crash", "digits-w1"),
        ("join", "digits-w3"),
        ("join", "digits-w4"),
        ("leave", "digits-w2"),
    ]
    assert all(e["steps_lost"] == 0 for e in job["events"])
    assert {j["worker"] for j in job["joins"]} == {"digits-w3", "digits-w4"}
    assert job["members_curve"][-1][1] == 3
    # Members that trained to the end (not the leaver) hold bit-identical states.
    digests = {p["name"]: p["state_sha256"] for p in job["processes"]}
    finishers = {digests[n] for n in ("digits-w0", "digits-w3", "digits-w4")}
    assert len(finishers) == 1 and None not in finishers, digests
    assert (tmp_path / "manifest.png").stat().st_size > 10_000
    assert not [p for p in job["processes"] if Path(f"/proc/{p['pid']}").exists()]
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
