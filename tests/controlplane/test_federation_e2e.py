"""Two parties federate end to end: two API servers on one etcd, two operators with their own
identities talking mutual TLS, two pod runners. One training run spans both parties; when
party beta's job is deleted and then its operator stopped, party alpha trains on. A ChaosPeer
with a wrong fingerprint never federates and says why."""

from __future__ import annotations

import base64
import contextlib
import json
import secrets
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import yaml
from chaos_operator.federation import identity as ident
from chaos_worker.net.tls import bound_parties, identity_of
from cryptography import x509

from tests.controlplane.operatorrun import JobView, OperatorRun, run_operator
from tests.controlplane.plane import REPO, ControlPlane, free_port, install_crds
from tests.controlplane.plane import poll as plane_poll
from tests.controlplane.podrunner import PodRunner

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


def worker_trust(plane: ControlPlane, ns: str, pod: str) -> tuple[str, set[str]]:
    """(the URI its certificate names, the parties its trust bundle is bound to besides its
    own CA) of a pod's `<pod>-tls` Secret."""
    data = plane.get("secret", f"{pod}-tls", ns)["data"]
    leaf = x509.load_pem_x509_certificate(base64.b64decode(data["tls.crt"]))
    who = identity_of(leaf)
    bundle = x509.load_pem_x509_certificates(base64.b64decode(data["ca.crt"]))
    bound = {p for cert in bundle for p in (bound_parties(cert) or ())}
    return f"chaos://{who.party}/{who.member}" if who else "", bound


def condition(body: dict[str, Any], type_: str) -> dict[str, Any]:
    return {c["type"]: c for c in body.get("status", {}).get("conditions", [])}.get(type_, {})


class Party:
    """One party: its API server, identity, and (once started) operator and pod runner."""

    def __init__(self, name: str, plane: ControlPlane, workdir: Path) -> None:
        self.name, self.plane, self.workdir = name, plane, workdir
        workdir.mkdir(parents=True, exist_ok=True)
        ident.write(ident.create(name), workdir / "identity")
        self.identity = ident.load(workdir / "identity")
        self.port = free_port()
        self.run: OperatorRun | None = None
        self.stopped = False
        self._stack = contextlib.ExitStack()

    def start(self, namespace: str, *more: str) -> None:
        args = [f"--namespace={ns}" for ns in more] + [
            "--federation-listen", f"127.0.0.1:{self.port}",
            "--identity", str(self.identity.directory), "--federation-interval", "1",
        ]  # fmt: skip
        self.run = self._stack.enter_context(
            run_operator(self.plane, namespace, self.workdir, args=args)
        )

    @property
    def runner(self) -> PodRunner:
        return self.run.runner

    def stop_operator(self) -> None:
        self.stopped = True
        process = self.run.process
        process.terminate()
        process.wait(20)

    def stop(self) -> None:
        self._stack.close()

    def diagnose(self) -> str:
        return f"=== {self.name}: " + (self.run.diagnose() if self.run else "not started")


def chaos_peer(name: str, ns: str, party: str, endpoint: str, **trust: str) -> dict[str, Any]:
    return {
        "apiVersion": "chaos.training.dev/v1alpha1",
        "kind": "ChaosPeer",
        "metadata": {"name": name, "namespace": ns},
        "spec": {"party": party, "endpoint": endpoint, **trust},
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

    alpha = Party("alpha", plane_a, tmp_path / "alpha")
    beta = Party("beta", plane_b, tmp_path / "beta")
    # alpha pins beta's key; beta trusts alpha's CA (both ways of pinning); a third ChaosPeer
    # in alpha pins the wrong key for beta's endpoint.
    plane_a.apply(
        chaos_peer("beta", ns, "beta", f"https://127.0.0.1:{beta.port}",
                   keyFingerprint=beta.identity.fingerprint),
        chaos_peer("beta-wrong", wrong_ns, "beta", f"https://127.0.0.1:{beta.port}",
                   keyFingerprint=alpha.identity.fingerprint),
    )  # fmt: skip
    plane_b.apply(
        chaos_peer("alpha", ns, "alpha", f"https://localhost:{alpha.port}",
                   caBundle=alpha.identity.ca_cert.decode()),
    )  # fmt: skip
    job_a, job_b = JobView(plane_a, ns, "digits"), JobView(plane_b, ns, "digits")

    def poll(check: Any, what: str, timeout: float = TIMEOUT_S) -> Any:
        def alive_check() -> Any:
            for party in (alpha, beta):
                if party.run and not party.stopped and party.run.process.poll() is not None:
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

        # Worker links are mutual TLS across parties: each pod's certificate names its party,
        # and its bundle holds the other party's worker CA, exchanged by the operators and
        # cross-certified bound to that party.
        assert all(config.get("tls") for config in configs.values()), configs
        for plane, party, other, job in (
            (plane_a, "alpha", "beta", job_a),
            (plane_b, "beta", "alpha", job_b),
        ):
            for pod in job.pods():
                poll(
                    lambda plane=plane, pod=pod, party=party, other=other: (
                        worker_trust(plane, ns, pod) == (f"chaos://{party}/{party}.{pod}", {other})
                    ),
                    f"{party}'s {pod} trusts {other}'s workers",
                )

        # One training run (over TLS): beta's member trains in a view of all three members.
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
        assert alpha.run.process.poll() is None, alpha.diagnose()
    finally:
        alpha.stop()
        beta.stop()
    for party in (alpha, beta):
        assert not party.runner.alive()
        assert not party.runner.errors, party.runner.errors
