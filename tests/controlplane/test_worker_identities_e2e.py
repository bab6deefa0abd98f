"""Worker identities end to end on a real API server: `chaos operator` issues every worker pod
a certificate in a Secret it owns, the pod runner mounts it, the members train over mutual
TLS (a newcomer pulls through the TLS replicator sidecars), and the garbage collector takes
the Secrets with the pods once the job is deleted."""

from __future__ import annotations

import base64
import json
import secrets
import socket
import ssl
from pathlib import Path
from typing import Any

import pytest
import yaml
from chaos_worker.config import Admission
from chaos_worker.net.tls import PeerIdentity, identity_of
from cryptography import x509

from tests.controlplane.operatorrun import JobView, run_operator
from tests.controlplane.plane import REPO, ControlPlane, install_crds

pytestmark = pytest.mark.controlplane

SELECTOR = "chaos.training.dev/job=digits"


def tls_secrets(plane: ControlPlane, ns: str) -> dict[str, dict[str, Any]]:
    """The job's identity Secrets by name."""
    out = plane.kubectl("get", "secrets", "-n", ns, "-l", SELECTOR, "-o", "json")
    return {s["metadata"]["name"]: s for s in json.loads(out.stdout)["items"]}


def data(secret: dict[str, Any]) -> dict[str, bytes]:
    return {k: base64.b64decode(v) for k, v in secret["data"].items()}


def connect(
    address: str, files: dict[str, bytes] | None, ca: bytes, tmp: Path, wait_s: float
) -> tuple[PeerIdentity | None, bool]:
    """(who the server at `address` is, whether it refused or closed the connection within
    `wait_s`) for a TLS 1.3 client with the certificate `files` (None: none)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.check_hostname = False
    ctx.load_verify_locations(cadata=ca.decode())
    if files is not None:
        (tmp / "c.crt").write_bytes(files["tls.crt"])
        (tmp / "c.key").write_bytes(files["tls.key"])
        ctx.load_cert_chain(tmp / "c.crt", tmp / "c.key")
    host, _, port = address.rpartition(":")
    try:
        with (
            socket.create_connection((host, int(port)), timeout=30) as raw,
            ctx.wrap_socket(raw) as tls,
        ):
            peer = identity_of(tls.getpeercert(binary_form=True))
            # TLS 1.3: the server checks the client's certificate after the client's side
            # of the handshake; a refusal arrives on the first read
            tls.settimeout(wait_s)
            try:
                closed = tls.recv(1) == b""
            except TimeoutError:
                closed = False
            except OSError:  # ssl.SSLError included
                closed = True
    except OSError:
        return None, True
    return peer, closed


def test_worker_pods_get_identities_train_over_tls_and_lose_them_with_the_job(
    control_plane_factory, tmp_path: Path
) -> None:
    plane = control_plane_factory("/party-identities")
    install_crds(plane)  # before the garbage collector starts, so it watches ChaosJobs at once
    plane.start_controller_manager()
    ns = f"id-{secrets.token_hex(3)}"
    plane.kubectl("create", "namespace", ns)

    with run_operator(plane, ns, tmp_path) as run:
        job = JobView(plane, ns, "digits")
        sample = yaml.safe_load((REPO / "examples" / "chaosjob.yaml").read_text())
        sample["metadata"]["namespace"] = ns
        sample["spec"]["replicas"] = 2
        plane.apply(sample)

        # Both members start once their Secrets exist, and train over mutual TLS.
        run.expect(lambda: job.running() == {"digits-w0", "digits-w1"}, "2 pods")
        first = run.expect(lambda: job.step() >= 2 and job.step(), "training progress")
        pods = job.pods()
        issued = tls_secrets(plane, ns)
        assert set(issued) == {"digits-w0-tls", "digits-w1-tls"}
        ca = data(plane.get("secret", "chaos-worker-ca", ns))
        ca_cert = x509.load_pem_x509_certificate(ca["tls.crt"])
        for name, pod in pods.items():
            secret = issued[f"{name}-tls"]
            assert secret["type"] == "kubernetes.io/tls"
            (owner,) = secret["metadata"]["ownerReferences"]
            assert (owner["kind"], owner["name"], owner["uid"]) == (
                "Pod",
                name,
                pod["metadata"]["uid"],
            )
            files = data(secret)
            assert files["ca.crt"] == ca["tls.crt"]
            cert = x509.load_pem_x509_certificate(files["tls.crt"])
            cert.verify_directly_issued_by(ca_cert)
            assert identity_of(cert) == PeerIdentity(ns, name)
            # its admission to the job, signed by the same CA: what the others check
            admission = Admission.model_validate_json(files["admission.json"])
            assert (admission.job, admission.party, admission.member) == ("digits", ns, name)
            assert admission.signed_by(ca_cert.public_key())  # type: ignore[arg-type]
            config = json.loads(pod["metadata"]["annotations"]["chaos.training.dev/config"])
            assert config["tls"] == {
                "cert": "/etc/chaos-tls/tls.crt",
                "key": "/etc/chaos-tls/tls.key",
                "ca": "/etc/chaos-tls/ca.crt",
                "admission": "/etc/chaos-tls/admission.json",
            }
            assert "PRIVATE KEY" not in json.dumps(pod)

        # The trainer and the replicator of w0 present w0's certificate to w1's...
        w0, w1 = pods["digits-w0"], data(issued["digits-w1-tls"])
        trainer = w0["metadata"]["annotations"]["chaos.training.dev/address"]
        host, _, port = trainer.rpartition(":")
        replicator = f"{host}:{int(port) + 2}"
        for address in (trainer, replicator):
            peer, closed = connect(address, w1, ca["tls.crt"], tmp_path, wait_s=2)
            assert (peer, closed) == (PeerIdentity(ns, "digits-w0"), False), address
            # ...and refuse a client without a certificate
            assert connect(address, None, ca["tls.crt"], tmp_path, wait_s=30)[1], address

        # A newcomer, admitted by its Secret's admission, pulls its state through the TLS
        # replicators and trains on.
        plane.kubectl("scale", "chaosjob/digits", "--replicas=3", "-n", ns)
        run.expect(lambda: "digits-w2" in job.running(), "scaled-up member")
        run.expect(lambda: job.steps_of(job.pods()["digits-w2"]) > 0, "the newcomer trains")
        run.expect(lambda: job.step() > first, "progress after the scale-up")
        assert set(tls_secrets(plane, ns)) == {f"digits-w{n}-tls" for n in range(3)}
        log = run.log_path.read_text(errors="replace")
        assert "issued" in log and "PRIVATE KEY" not in log
        assert "PRIVATE KEY" not in json.dumps(job.event_list())

        # Deleting the job: the pods go, and their Secrets with them; the CA stays.
        plane.kubectl("delete", "chaosjob", "digits", "-n", ns, "--wait=false")
        run.expect(lambda: not job.pods(), "pods collected")
        run.expect(lambda: not tls_secrets(plane, ns), "identity Secrets collected")
        assert plane.get("secret", "chaos-worker-ca", ns)["metadata"]["name"] == "chaos-worker-ca"
        run.expect(lambda: not run.runner.alive(), "processes stopped")
        assert run.process.poll() is None, run.diagnose()
    assert not run.runner.errors, run.runner.errors
