"""`chaos operator` as a subprocess with the test pod runner, and a view of one ChaosJob:
what the operator tests share."""

from __future__ import annotations

import contextlib
import json
import os
import random
import socket
import subprocess
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from tests.controlplane.plane import REPO, ControlPlane, _die_with_parent, free_port
from tests.controlplane.plane import poll as plane_poll
from tests.controlplane.podrunner import PodRunner

MEMBERS = 10  # ports reserved for this many members
TIMEOUT_S = 150.0  # generous: several torch processes start on two cores


def free_range(count: int) -> int:
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


class JobView:
    """Reads a job, its pods, its Events and its members' metrics during a test."""

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

    def samples_of(self, pod: dict[str, Any], name: str) -> list[tuple[dict[str, str], float]]:
        """The samples called `name` in one member's /metrics (none while it does not
        answer)."""
        port = pod["metadata"]["annotations"]["chaos.training.dev/metrics-port"]
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as r:
                text = r.read().decode()
        except OSError:
            return []
        return [
            (sample.labels, sample.value)
            for family in text_string_to_metric_families(text)
            for sample in family.samples
            if sample.name == name
        ]

    def steps_of(self, pod: dict[str, Any]) -> int:
        """chaos_train_steps_total of one member (0 while it does not answer)."""
        return int(sum(v for _, v in self.samples_of(pod, "chaos_train_steps_total")))

    def replication_bytes(self, pod: dict[str, Any], direction: str) -> dict[str, float]:
        """chaos_replication_bytes_total of one member in `direction`, by peer."""
        samples = self.samples_of(pod, "chaos_replication_bytes_total")
        return {labels["peer"]: v for labels, v in samples if labels["direction"] == direction}

    def step(self) -> int:
        return int(self.status().get("currentStep", -1))

    def event_list(self) -> list[dict[str, Any]]:
        """The job's Events, oldest first."""
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
        items = json.loads(out.stdout)["items"]
        return sorted(items, key=lambda e: e.get("firstTimestamp") or "")

    def events(self) -> list[str]:
        return [e["reason"] for e in self.event_list()]


@dataclass
class OperatorRun:
    """A running `chaos operator` and the pod runner that plays the kubelet for it."""

    process: subprocess.Popen[bytes]
    runner: PodRunner
    log_path: Path
    liveness: int
    metrics: int

    def operator_metric(self, series: str) -> float:
        """The value of one series on the operator's own /metrics."""
        url = f"http://127.0.0.1:{self.metrics}/metrics"
        with urllib.request.urlopen(url, timeout=5) as r:
            for line in r.read().decode().splitlines():
                if line.startswith(f"{series} "):
                    return float(line.split()[1])
        raise AssertionError(f"{series} not on the operator's /metrics")

    def poll(self, check: Callable[[], Any], what: str, timeout: float = TIMEOUT_S) -> Any:
        """`plane.poll` that fails at once if the operator exited."""

        def alive_check() -> Any:
            if self.process.poll() is not None:
                raise AssertionError(f"the operator exited ({self.process.returncode})")
            return check()

        return plane_poll(alive_check, what, timeout)

    def expect(self, check: Callable[[], Any], what: str, timeout: float = TIMEOUT_S) -> Any:
        """`poll`, failing with `diagnose()` in the message."""
        try:
            return self.poll(check, what, timeout)
        except (TimeoutError, AssertionError) as exc:
            raise AssertionError(f"{exc}\n{self.diagnose()}") from None

    def diagnose(self) -> str:
        """The operator's log tail, the runner's errors and each pod's log tail."""
        tail = "\n".join(self.log_path.read_text(errors="replace").splitlines()[-40:])
        logs = "\n".join(
            f"--- {name}\n" + "\n".join(self.runner.log(name).splitlines()[-10:])
            for name in sorted(self.runner.pods)
        )
        return f"operator log:\n{tail}\nrunner errors: {self.runner.errors}\n{logs}"


@contextlib.contextmanager
def run_operator(
    plane: ControlPlane, namespace: str, workdir: Path, *, args: Sequence[str] = ()
) -> Iterator[OperatorRun]:
    """Start the pod runner and `chaos operator -n namespace --pod-host 127.0.0.1 --resync 2`
    (plus `args`); stop both on exit."""
    runner = PodRunner(plane.kubeconfig, namespace, workdir / "pods").start()
    liveness, metrics = free_port(), free_port()
    log_path = workdir / "operator.log"
    env = {**os.environ, "KUBECONFIG": str(plane.kubeconfig)}
    argv = [
        str(REPO / ".venv" / "bin" / "chaos"),
        "operator",
        "--namespace",
        namespace,
        "--pod-host",
        "127.0.0.1",
        "--base-port",
        str(free_range(3 * MEMBERS)),
        "--resync",
        "2",
        "--liveness",
        f"http://127.0.0.1:{liveness}/healthz",
        "--metrics-host",
        "127.0.0.1",
        "--metrics-port",
        str(metrics),
        *args,
    ]
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            argv,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            preexec_fn=_die_with_parent,
        )
    try:
        yield OperatorRun(process, runner, log_path, liveness, metrics)
    finally:
        process.terminate()
        try:
            process.wait(20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        runner.stop()
