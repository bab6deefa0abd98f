"""Two parties federate end to end: two API servers on one etcd, two operators with their own
identities talking mutual TLS, two pod runners. One training run spans both parties; when
party beta's job is deleted and then its operator stopped, party alpha trains on. A ChaosPeer
with a wrong fingerprint never federates and says why."""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import yaml
from chaos_operator.federation import identity as ident

from tests.controlplane.plane import REPO, ControlPlane, _die_with_parent, free_port, install_crds
from tests.controlplane.plane import poll as plane_poll
from tests.controlplane.podrunner import PodRunner
from tests.controlplane.test_operator_e2e import MEMBERS, Job, _free_range

pytestmark = pytest.mark.controlplane

TIMEOUT_S = 180.0  # generous: three torch workers and two operators on two shared cores
FEDERATION = "digits-fed"


def metric(pod: dict[str, Any], name: str) -> float | None:
    """One unlabelled sample of a member's /metrics (None while it does not answer)."""
    port = pod["metadata"]["annotations"]["chaos.training.dev/metrics-port"]
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as r:
            text = r.read().decode()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith(f"{name} "):
            return float(line.split()[1])
    return None


def condition(body: dict[str, Any], type_: str) -> dict[str, Any]:
    return {c["type"]: c for c in body.get("status", {}).get("conditions", [])}.get(type_, {})


class Party:
    """One party: its API server, identity, operator process and pod runner."""

    def __init__(self, name: str, plane: ControlPlane, workdir: Path, base_port: int) -> None:
        self.name, self.plane, self.workdir = name, plane, workdir
        workdir.mkdir(parents=True, exist_ok=True)
        ident.write(ident.create(name), workdir / "identity")
        self.identity = ident.load(workdir / "identity")
        self.port = free_port()
        self.base_port = base_port
        self.operator: subprocess.Popen | None = None
        self.runner: PodRunner | None = None
        self.log_path = workdir / "operator.log"
        self.stopped = False

    def start(self, *namespaces: str) -> None:
        argv = [str(REPO / ".venv" / "bin" / "chaos"), "operator"]
        for ns in namespaces:
            argv += ["--namespace", ns]
        argv += [
            "--pod-host", "127.0.0.1", "--base-port", str(self.base_port), "--resync", "2",
            "--liveness", "off", "--federation-listen", f"127.0.0.1:{self.port}",
            "--identity", str(self.identity.directory), "--federation-interval", "1",
        ]  # fmt: skip
        env = {**os.environ, "KUBECONFIG": str(self.plane.kubeconfig)}
        with self.log_path.open("wb") as log:
            self.operator = subprocess.Popen(
                argv,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                preexec_fn=_die_with_parent,
            )
        self.runner = PodRunner(self.plane.kubeconfig, namespaces[0], self.workdir / "pods").start()

    def stop_operator(self) -> None:
        self.stopped = True
        if self.operator and self.operator.poll() is None:
            self.operator.terminate()
            try:
                self.operator.wait(20)
            except subprocess.TimeoutExpired:
                self.operator.kill()
                self.operator.wait()

    def stop(self) -> None:
        self.stop_operator()
        if self.runner:
            self.runner.stop()

    def diagnose(self) -> str:
        tail = "\n".join(self.log_path.read_text(errors="replace").splitlines()[-30:])
        runner = self.runner
        logs = "" if runner is None else "\n".join(
            f"--- {self.name}/{pod}\n" + "\n".join(runner.log(pod).splitlines()[-8:])
            for pod in sorted(runner.pods)
        )  # fmt: skip
        errors = runner.errors if runner else []
        return f"=== {self.name} operator:\n{tail}\nrunner errors: {errors}\n{logs}"


def chaos_peer(name: str, ns: str, endpoint: str, **trust: str) -> dict[str, Any]:
    return {
        "apiVersion": "chaos.training.dev/v1alpha1",
        "kind": "ChaosPeer",
        "metadata": {"name": name, "namespace": ns},
        "spec": {"endpoint": endpoint, **trust},
    }


def chaos_job(ns: str, replicas: int) -> dict[str, Any]:
    job = yaml.safe_load((REPO / "examples" / "chaosjob.yaml").read_text())
    job["metadata"]["namespace"] = ns
    job["spec"].update(federation=FEDERATION, replicas=replicas, minReplicas=0)
    job["spec"]["resources"] = {}
    return job


def test_two_parties_train_together_and_each_goes_on_without_the_other(
    control_plane_factory, tmp_path: Path
) -> None:
    plane_a = control_plane_factory("/fed-alpha")
    plane_b = control_plane_factory("/fed-beta")
    for plane in (plane_a, plane_b):
        install_crds(plane)
    plane_b.start_controller_manager()  # beta's job is deleted: its pods must be collected
    ns, wrong_ns = f"fed-{secrets.token_hex(3)}", f"fedx-{secrets.token_hex(3)}"
    for plane in (plane_a, plane_b):
        plane.kubectl("create", "namespace", ns)
    plane_a.kubectl("create", "namespace", wrong_ns)

    base_a = base_b = _free_range(3 * MEMBERS)
    while abs(base_b - base_a) < 3 * MEMBERS:
        base_b = _free_range(3 * MEMBERS)
    alpha = Party("alpha", plane_a, tmp_path / "alpha", base_a)
    beta = Party("beta", plane_b, tmp_path / "beta", base_b)
    # alpha pins beta's key; beta trusts alpha's CA (both ways of pinning); a third ChaosPeer
    # in alpha pins the wrong key for beta's endpoint.
    plane_a.apply(
        chaos_peer("beta", ns, f"https://127.0.0.1:{beta.port}",
                   keyFingerprint=beta.identity.fingerprint),
        chaos_peer("beta-wrong", wrong_ns, f"https://127.0.0.1:{beta.port}",
                   keyFingerprint=alpha.identity.fingerprint),
    )  # fmt: skip
    plane_b.apply(
        chaos_peer("alpha", ns, f"https://localhost:{alpha.port}",
                   caBundle=alpha.identity.ca_cert.decode()),
    )  # fmt: skip
    job_a, job_b = Job(plane_a, ns, "digits"), Job(plane_b, ns, "digits")

    def poll(check: Any, what: str, timeout: float = TIMEOUT_S) -> Any:
        def alive_check() -> Any:
            for party in (alpha, beta):
                if party.operator and not party.stopped and party.operator.poll() is not None:
                    raise AssertionError(f"{party.name}'s operator exited")
            return check()

        try:
            return plane_poll(alive_check, what, timeout)
        except (TimeoutError, AssertionError) as exc:
            raise AssertionError(f"{exc}\n{alpha.diagnose()}\n{beta.diagnose()}") from None

    try:
        alpha.start(ns, wrong_ns)
        beta.start(ns)

        # The operators federate; the wrong pin never does, and says why.
        def federated(plane: ControlPlane, name: str, namespace: str = ns) -> dict[str, Any]:
            return condition(plane.get("chaospeer", name, namespace), "Federated")

        poll(lambda: federated(plane_a, "beta").get("status") == "True", "alpha federated")
        poll(lambda: federated(plane_b, "alpha").get("status") == "True", "beta federated")
        wrong = poll(lambda: federated(plane_a, "beta-wrong", wrong_ns).get("reason"), "wrong")
        assert wrong == "FingerprintMismatch"
        wrong_peer = plane_a.get("chaospeer", "beta-wrong", wrong_ns)
        assert wrong_peer["status"]["reachable"] is False
        assert beta.identity.fingerprint in condition(wrong_peer, "Federated")["message"]
        events = json.loads(plane_a.kubectl("get", "events", "-n", wrong_ns, "-o", "json").stdout)[
            "items"
        ]
        assert any(e["reason"] == "FingerprintMismatch" for e in events), events

        # Both parties create their job at once. Exactly one initial set is formed — by alpha,
        # the smaller name, unless load delayed alpha's operator so much that beta's set was
        # already starting — and the other party's members join through it.
        plane_a.apply(chaos_job(ns, 2))
        plane_b.apply(chaos_job(ns, 1))
        poll(lambda: job_a.running() == {"digits-w0", "digits-w1"}, "alpha's 2 members")
        poll(lambda: job_b.running() == {"digits-w0"}, "beta's member")
        configs = {
            f"{party}.{n}": json.loads(p["metadata"]["annotations"]["chaos.training.dev/config"])
            for party, job in (("alpha", job_a), ("beta", job_b))
            for n, p in job.pods().items()
        }
        assert all(config["id"] == member for member, config in configs.items())
        seeds = {m.partition(".")[0] for m, c in configs.items() if "members" in c}
        assert len(seeds) == 1, configs  # one initial set, of one party
        (seed,) = seeds
        addresses = {c["listen"] for m, c in configs.items() if m.startswith(f"{seed}.")}
        for member, config in configs.items():
            if not member.startswith(f"{seed}."):
                assert config["join"] in addresses, configs
        print(f"initial set formed by {seed}")

        # One training run: beta's member trains in a view of all three members.
        poll(lambda: (metric(job_b.pods()["digits-w0"], "chaos_train_steps_total") or 0) > 0,
             "beta's member trains")  # fmt: skip
        poll(lambda: metric(job_b.pods()["digits-w0"], "chaos_members") == 3, "3 in beta's view")
        poll(lambda: metric(job_a.pods()["digits-w0"], "chaos_members") == 3, "3 in alpha's view")
        poll(lambda: job_a.status().get("remoteMembers") == 1, "alpha sees beta's member")
        poll(lambda: job_b.status().get("remoteMembers") == 2, "beta sees alpha's members")
        for job in (job_a, job_b):
            synced = condition(job.body(), "FederationSynced")
            assert synced.get("status") == "True", synced
        poll(lambda: plane_a.get("chaospeer", "beta", ns)["status"].get("members") == 1,
             "alpha's ChaosPeer counts beta's member")  # fmt: skip
        assert job_b.status().get("localMembers") == 1

        # beta's job goes: its member leaves; alpha trains on, now alone.
        plane_b.kubectl("delete", "chaosjob", "digits", "-n", ns, "--wait=false")
        poll(lambda: not job_b.pods(), "beta's pods collected")
        poll(lambda: not beta.runner.alive(), "beta's processes stopped")
        poll(lambda: metric(job_a.pods()["digits-w0"], "chaos_members") == 2, "alpha's view of 2")
        poll(lambda: job_a.status().get("remoteMembers") == 0, "alpha sees no remote member")
        step = job_a.step()
        poll(lambda: job_a.step() > step, "alpha's training goes on")

        # beta's operator goes too: alpha's peer becomes unreachable, alpha still trains.
        beta.stop_operator()
        poll(lambda: federated(plane_a, "beta").get("reason") == "Unreachable", "unreachable")
        assert plane_a.get("chaospeer", "beta", ns)["status"]["reachable"] is False
        synced = poll(
            lambda: (
                condition(job_a.body(), "FederationSynced").get("status") == "False"
                and condition(job_a.body(), "FederationSynced")
            ),
            "alpha's job not synced",
        )
        assert synced["reason"] == "PeersNotSynced"
        step = job_a.step()
        poll(lambda: job_a.step() > step, "alpha trains without beta's operator")
        assert job_a.running() == {"digits-w0", "digits-w1"}
        assert alpha.operator.poll() is None, alpha.diagnose()
    finally:
        alpha.stop()
        beta.stop()
    for party in (alpha, beta):
        assert not party.runner.alive()
        assert not party.runner.errors, party.runner.errors
