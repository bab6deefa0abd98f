"""The operator end to end on a real API server: `chaos operator` reconciles the sample
ChaosJob into pods that the test pod runner runs as local worker processes; training goes on
through a deleted pod and a scale-up; deleting the job leaves no pod and no process."""

from __future__ import annotations

import json
import os
import random
import secrets
import socket
import subprocess
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.controlplane.plane import REPO, ControlPlane, _die_with_parent, install_crds
from tests.controlplane.plane import poll as plane_poll
from tests.controlplane.podrunner import PodRunner

pytestmark = pytest.mark.controlplane

MEMBERS = 10  # ports reserved for this many members
TIMEOUT_S = 150.0  # generous: six torch processes start on two cores


def _free_range(count: int) -> int:
    """A base port with `count` consecutive ports free on every address right now."""
    for _ in range(50):
        base = random.randrange(20000, 30000)
        try:
            for port in range(base, base + count):
                with socket.socket() as sock:
                    sock.bind(("0.0.0.0", port))
            return base
        except OSError:
            continue
    raise RuntimeError("no free port range")


def operator_metric(port: int, series: str) -> float:
    """The value of one series on the operator's /metrics."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        for line in r.read().decode().splitlines():
            if line.startswith(f"{series} "):
                return float(line.split()[1])
    raise AssertionError(f"{series} not on the operator's /metrics")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Job:
    """Reads the job, its pods and its members' metrics during the test."""

    def __init__(self, plane: ControlPlane, namespace: str, name: str) -> None:
        self.plane, self.ns, self.name = plane, namespace, name

    def body(self) -> dict[str, Any]:
        return self.plane.get("chaosjob", self.name, self.ns)

    def status(self) -> dict[str, Any]:
        return self.body().get("status", {})

    def pods(self) -> dict[str, dict[str, Any]]:
        out = self.plane.kubectl(
            "get", "pods", "-n", self.ns, "-l", f"chaos.training.dev/job={self.name}", "-o", "json"
        )
        return {p["metadata"]["name"]: p for p in json.loads(out.stdout)["items"]}

    def running(self) -> set[str]:
        return {
            name
            for name, pod in self.pods().items()
            if pod.get("status", {}).get("phase") == "Running"
            and not pod["metadata"].get("deletionTimestamp")
        }

    def steps_of(self, pod: dict[str, Any]) -> int:
        """chaos_train_steps_total of one member (0 while it does not answer)."""
        port = pod["metadata"]["annotations"]["chaos.training.dev/metrics-port"]
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as r:
                text = r.read().decode()
        except OSError:
            return 0
        for line in text.splitlines():
            if line.startswith("chaos_train_steps_total "):
                return int(float(line.split()[1]))
        return 0

    def step(self) -> int:
        return int(self.status().get("currentStep", -1))

    def events(self) -> list[str]:
        out = self.plane.kubectl(
            "get",
            "events",
            "-n",
            self.ns,
            "--field-selector",
            f"involvedObject.name={self.name}",
            "-o",
            "json",
        )
        return [e["reason"] for e in json.loads(out.stdout)["items"]]


def test_operator_runs_a_job_through_loss_scale_up_and_deletion(
    control_plane_factory, tmp_path: Path
) -> None:
    plane = control_plane_factory("/party-operator")
    install_crds(plane)  # before the garbage collector starts, so it watches ChaosJobs at once
    plane.start_controller_manager()
    ns = f"op-{secrets.token_hex(3)}"
    plane.kubectl("create", "namespace", ns)

    runner = PodRunner(plane.kubeconfig, ns, tmp_path / "pods").start()
    liveness, metrics = _free_port(), _free_port()
    log_path = tmp_path / "operator.log"
    env = {**os.environ, "KUBECONFIG": str(plane.kubeconfig)}
    with log_path.open("wb") as log:
        operator = subprocess.Popen(
            [
                str(REPO / ".venv" / "bin" / "chaos"),
                "operator",
                "--namespace",
                ns,
                "--pod-host",
                "127.0.0.1",
                "--base-port",
                str(_free_range(3 * MEMBERS)),
                "--resync",
                "2",
                "--liveness",
                f"http://127.0.0.1:{liveness}/healthz",
                "--metrics-host",
                "127.0.0.1",
                "--metrics-port",
                str(metrics),
            ],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            preexec_fn=_die_with_parent,
        )
    job = Job(plane, ns, "digits")

    def poll(check: Any, what: str, timeout: float = TIMEOUT_S) -> Any:
        def alive_check() -> Any:
            if operator.poll() is not None:
                raise AssertionError(f"the operator exited ({operator.returncode})")
            return check()

        return plane_poll(alive_check, what, timeout)

    def diagnose() -> str:
        tail = "\n".join(log_path.read_text(errors="replace").splitlines()[-40:])
        logs = "\n".join(
            f"--- {name}\n" + "\n".join(runner.log(name).splitlines()[-10:])
            for name in sorted(runner.pods)
        )
        return f"operator log:\n{tail}\nrunner errors: {runner.errors}\n{logs}"

    try:
        sample = yaml.safe_load((REPO / "examples" / "chaosjob.yaml").read_text())
        sample["metadata"]["namespace"] = ns
        plane.apply(sample)

        # Three initial members start together and train.
        try:
            poll(
                lambda: job.running() == {"digits-w0", "digits-w1", "digits-w2"},
                "3 pods",
                TIMEOUT_S,
            )
            first = poll(lambda: job.step() >= 2 and job.step(), "training progress", TIMEOUT_S)
        except (TimeoutError, AssertionError) as exc:
            raise AssertionError(f"{exc}\n{diagnose()}") from None
        configs = {n: json.loads(p["metadata"]["annotations"]["chaos.training.dev/config"])
                   for n, p in job.pods().items()}  # fmt: skip
        assert all(len(c["members"]) == 3 for c in configs.values())
        with urllib.request.urlopen(f"http://127.0.0.1:{liveness}/healthz", timeout=5) as r:
            assert r.status == 200
        service = plane.get("service", "digits-workers", ns)
        assert service["spec"]["clusterIP"] == "None"
        status = job.status()
        assert status["selector"] == "chaos.training.dev/job=digits"
        assert status["observedGeneration"] == job.body()["metadata"]["generation"]

        # A deleted pod is replaced by a new member that joins through a live one.
        plane.kubectl("delete", "pod", "digits-w1", "-n", ns, "--wait=false")
        try:
            poll(
                lambda: job.running() == {"digits-w0", "digits-w2", "digits-w3"},
                "replacement",
                TIMEOUT_S,
            )
            pods = job.pods()
            config = json.loads(pods["digits-w3"]["metadata"]["annotations"][
                "chaos.training.dev/config"])  # fmt: skip
            assert "members" not in config
            assert config["join"] in {
                configs["digits-w0"]["listen"],
                configs["digits-w2"]["listen"],
            }
            poll(lambda: job.steps_of(job.pods()["digits-w3"]) > 0, "replacement trains", TIMEOUT_S)
            second = poll(lambda: job.step() > first and job.step(), "progress", TIMEOUT_S)
            poll(lambda: job.status().get("phase") == "Running", "phase Running", TIMEOUT_S)
        except (TimeoutError, AssertionError) as exc:
            raise AssertionError(f"{exc}\n{diagnose()}") from None
        poll(lambda: "digits-w1" not in runner.alive(), "deleted pod's processes stopped")

        # Scaling up adds a member that joins through the data plane.
        plane.kubectl("scale", "chaosjob/digits", "--replicas=4", "-n", ns)
        try:
            poll(lambda: "digits-w4" in job.running(), "scaled-up member", TIMEOUT_S)
            poll(lambda: job.steps_of(job.pods()["digits-w4"]) > 0, "new member trains", TIMEOUT_S)
            poll(lambda: job.step() > second, "progress after scale-up", TIMEOUT_S)
            poll(
                lambda: job.status().get("replicas") == 4 and job.status().get("localMembers") == 4,
                "status of 4 members",
                TIMEOUT_S,
            )
        except (TimeoutError, AssertionError) as exc:
            raise AssertionError(f"{exc}\n{diagnose()}") from None
        reasons = job.events()
        assert reasons.count("MemberAdded") >= 5, reasons
        ready = {c["type"]: c for c in job.status()["conditions"]}["Ready"]
        assert ready["status"] == "True"

        # Scaling down deletes the newest members; the others train on.
        plane.kubectl("scale", "chaosjob/digits", "--replicas=2", "-n", ns)
        try:
            poll(lambda: job.running() == {"digits-w0", "digits-w2"}, "scaled down", TIMEOUT_S)
            third = job.step()
            poll(lambda: job.step() > third, "progress after scale-down", TIMEOUT_S)
            poll(lambda: job.status().get("phase") == "Running", "phase Running", TIMEOUT_S)
        except (TimeoutError, AssertionError) as exc:
            raise AssertionError(f"{exc}\n{diagnose()}") from None
        assert "MemberRemoved" in job.events()
        poll(lambda: not {"digits-w3", "digits-w4"} & set(runner.alive()), "removed stopped")
        # SIGTERM made them leave at an agreed step and exit cleanly, not die mid-step
        assert runner.exits["digits-w4"]["trainer"] == 0, runner.exits
        assert runner.exits["digits-w3"]["trainer"] == 0, runner.exits
        # The operator's own metrics saw all of it: w0..w4 created, w3 and w4 deleted.
        assert operator_metric(metrics, "chaos_operator_pods_created_total") == 5
        assert operator_metric(metrics, "chaos_operator_pods_deleted_total") >= 2
        assert operator_metric(metrics, 'chaos_operator_jobs{phase="Running"}') == 1
        assert operator_metric(metrics, 'chaos_operator_reconcile_total{result="ok"}') > 5

        # Deleting the job: the garbage collector removes the pods, the runner their processes.
        plane.kubectl("delete", "chaosjob", "digits", "-n", ns, "--wait=false")
        try:
            poll(lambda: not job.pods(), "pods collected", TIMEOUT_S)
            poll(lambda: not runner.alive(), "processes stopped", TIMEOUT_S)
        except (TimeoutError, AssertionError) as exc:
            raise AssertionError(f"{exc}\n{diagnose()}") from None
        assert operator.poll() is None, diagnose()
    finally:
        operator.terminate()
        try:
            operator.wait(20)
        except subprocess.TimeoutExpired:
            operator.kill()
            operator.wait()
        runner.stop()
    assert not runner.alive()
    assert not runner.errors, runner.errors
