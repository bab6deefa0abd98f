"""A real control plane for tests: etcd plus kube-apiserver (plus, on request,
kube-controller-manager) on loopback, with throwaway keys and an admin kubeconfig.

The binaries come from `scripts/build-k8s.sh` (or `CHAOS_K8S_BIN`); etcd is Debian's
`etcd-server` (or `CHAOS_ETCD`). Several API servers can share one etcd, each under its own
`--etcd-prefix`, to act as independent clusters of different parties.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import ipaddress
import json
import os
import secrets
import shutil
import signal
import ssl
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from chaos_cli.local.launcher import free_ports
from chaos_operator.federation.identity import self_signed_ca
from chaos_worker.priority import die_with_parent
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

REPO = Path(__file__).resolve().parents[2]
K8S_BINARIES = ("kube-apiserver", "kube-controller-manager", "kubectl")
START_TIMEOUT_S = 180.0  # generous: a loaded 2-core machine is slow to bring up the API server
STOP_TIMEOUT_S = 15.0


class ControlPlaneUnavailable(Exception):
    """The binaries needed for a control plane are missing (message says how to get them)."""


class KubectlError(subprocess.CalledProcessError):
    """kubectl failed; the message includes its stderr."""

    def __str__(self) -> str:
        return f"kubectl {' '.join(self.cmd[3:])} failed ({self.returncode}): {self.stderr}"


def k8s_bin_dir() -> Path:
    """Where kube-apiserver, kube-controller-manager and kubectl are: `CHAOS_K8S_BIN`, else
    the cache directory of the release pinned in scripts/build-k8s.sh."""
    if os.environ.get("CHAOS_K8S_BIN"):
        return Path(os.environ["CHAOS_K8S_BIN"])
    out = subprocess.run(
        ["bash", str(REPO / "scripts" / "build-k8s.sh"), "--print-bin-dir"],
        check=True,
        capture_output=True,
        text=True,
    )
    return Path(out.stdout.strip())


def find_binaries() -> tuple[Path, Path]:
    """(Kubernetes bin dir, etcd binary); ControlPlaneUnavailable when something is missing."""
    bin_dir = k8s_bin_dir()
    missing = [name for name in K8S_BINARIES if not os.access(bin_dir / name, os.X_OK)]
    if missing:
        raise ControlPlaneUnavailable(
            f"{', '.join(missing)} not found in {bin_dir}; build them with "
            "`bash scripts/build-k8s.sh` (or point CHAOS_K8S_BIN at a directory holding them)"
        )
    etcd = os.environ.get("CHAOS_ETCD") or shutil.which("etcd") or str(bin_dir / "etcd")
    if not os.access(etcd, os.X_OK):
        raise ControlPlaneUnavailable(
            "etcd not found; `apt-get install etcd-server` (scripts/install.sh does) "
            "or set CHAOS_ETCD"
        )
    return bin_dir, Path(etcd)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nobody listens on right now, below the ephemeral range
    (see `chaos_cli.local.launcher.free_ports`)."""
    return free_ports(1, 0)[0]


_die_with_parent = die_with_parent(signal.SIGTERM)
"""In the child: get SIGTERM when the test process dies, so nothing outlives a killed run."""


@dataclass
class Process:
    """A server process started by the tests, logging to a file."""

    name: str
    argv: list[str]
    log: Path
    popen: subprocess.Popen = field(init=False)

    def start(self) -> Process:
        with self.log.open("wb") as log:
            self.popen = subprocess.Popen(
                self.argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                preexec_fn=_die_with_parent,
            )
        return self

    def alive(self) -> bool:
        return self.popen.poll() is None

    def log_tail(self, lines: int = 30) -> str:
        text = self.log.read_text(errors="replace").splitlines()
        return "\n".join(text[-lines:])

    def wait_until(self, ready: Callable[[], bool], what: str) -> None:
        """Poll `ready` until it holds; fail with the log tail if the process dies or hangs."""
        deadline = time.monotonic() + START_TIMEOUT_S
        while not ready():
            if not self.alive():
                raise RuntimeError(
                    f"{self.name} exited ({self.popen.returncode}) before {what}:\n"
                    f"{self.log_tail()}"
                )
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"{self.name}: no {what} in {START_TIMEOUT_S:.0f} s:\n{self.log_tail()}"
                )
            time.sleep(0.2)

    def stop(self) -> None:
        """SIGTERM, then SIGKILL if it does not exit; always reaps the process."""
        if self.popen.poll() is None:
            self.popen.terminate()
            try:
                self.popen.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()


def _http_ok(url: str, context: ssl.SSLContext | None = None, token: str | None = None) -> bool:
    request = urllib.request.Request(url)
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=5, context=context) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError):
        return False


@dataclass
class Etcd:
    """One etcd on loopback with a throwaway data directory."""

    url: str
    process: Process
    data_dir: Path

    @classmethod
    def start(cls, etcd: Path, workdir: Path) -> Etcd:
        client, peer = free_port(), free_port()
        data_dir = workdir / "etcd-data"
        argv = [
            str(etcd),
            "--name=default",
            f"--data-dir={data_dir}",
            f"--listen-client-urls=http://127.0.0.1:{client}",
            f"--advertise-client-urls=http://127.0.0.1:{client}",
            f"--listen-peer-urls=http://127.0.0.1:{peer}",
            f"--initial-advertise-peer-urls=http://127.0.0.1:{peer}",
            f"--initial-cluster=default=http://127.0.0.1:{peer}",
            "--unsafe-no-fsync",
            "--log-level=warn",
        ]
        process = Process("etcd", argv, workdir / "etcd.log").start()
        url = f"http://127.0.0.1:{client}"
        try:
            process.wait_until(lambda: _http_ok(f"{url}/health"), "healthy /health")
        except BaseException:
            process.stop()
            raise
        return cls(url, process, data_dir)

    def stop(self) -> None:
        self.process.stop()
        shutil.rmtree(self.data_dir, ignore_errors=True)


def _pem(obj: Any) -> bytes:
    if isinstance(obj, x509.Certificate):
        return obj.public_bytes(serialization.Encoding.PEM)
    return obj.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def write_pki(directory: Path) -> dict[str, Path]:
    """A throwaway CA, a serving certificate for 127.0.0.1/localhost, a service-account key."""
    now = dt.datetime.now(dt.UTC)
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "chaos-test-ca")])
    ca_key, ca = self_signed_ca(ca_name, now - dt.timedelta(hours=1), now + dt.timedelta(days=2))
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "kube-apiserver")]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(hours=1))
        .not_valid_after(now + dt.timedelta(days=2))
        .add_extension(
            x509.SubjectAlternativeName(
                [
                    x509.DNSName("localhost"),
                    x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                ]
            ),
            critical=False,
        )
        .add_extension(
            x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    sa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    paths = {
        "ca": directory / "ca.crt",
        "cert": directory / "apiserver.crt",
        "key": directory / "apiserver.key",
        "sa": directory / "sa.key",
    }
    paths["ca"].write_bytes(_pem(ca))
    paths["cert"].write_bytes(_pem(cert))
    paths["key"].write_bytes(_pem(key))
    paths["sa"].write_bytes(_pem(sa_key))
    for name in ("key", "sa"):
        paths[name].chmod(0o600)
    return paths


@dataclass
class ControlPlane:
    """One kube-apiserver (one 'cluster') and how to talk to it as cluster admin."""

    server: str
    kubeconfig: Path
    token: str
    ca_file: Path
    bin_dir: Path
    workdir: Path
    etcd_prefix: str
    processes: list[Process] = field(default_factory=list)

    def kubectl(
        self, *args: str, input: str | None = None, check: bool = True, timeout: float = 120
    ) -> subprocess.CompletedProcess[str]:
        """Run kubectl against this API server as admin; KubectlError on failure if `check`."""
        cmd = [
            str(self.bin_dir / "kubectl"),
            f"--kubeconfig={self.kubeconfig}",
            f"--cache-dir={self.workdir / 'kubectl-cache'}",
            *args,
        ]
        done = subprocess.run(cmd, input=input, capture_output=True, text=True, timeout=timeout)
        if check and done.returncode != 0:
            raise KubectlError(done.returncode, cmd, done.stdout, done.stderr)
        return done

    def apply(self, *objects: dict[str, Any], check: bool = True) -> subprocess.CompletedProcess:
        """`kubectl apply -f -` of the given objects."""
        return self.kubectl("apply", "-f", "-", input=yaml.safe_dump_all(objects), check=check)

    def get(self, kind: str, name: str, namespace: str | None = None) -> dict[str, Any]:
        """One object as a dict (`kubectl get -o json`)."""
        ns = [f"--namespace={namespace}"] if namespace else []
        return json.loads(self.kubectl("get", kind, name, *ns, "-o", "json").stdout)

    def start_controller_manager(
        self, controllers: str = "garbagecollector,namespace,serviceaccount,serviceaccount-token"
    ) -> Process:
        """Start kube-controller-manager (garbage collection, namespace deletion, service
        accounts by default); it stops with this control plane."""
        argv = [
            str(self.bin_dir / "kube-controller-manager"),
            f"--kubeconfig={self.kubeconfig}",
            f"--controllers={controllers}",
            f"--service-account-private-key-file={self.workdir / 'pki' / 'sa.key'}",
            f"--root-ca-file={self.ca_file}",
            "--leader-elect=false",
            "--secure-port=0",
            "--use-service-account-credentials=false",
        ]
        log = self.workdir / "kube-controller-manager.log"
        process = Process("kube-controller-manager", argv, log).start()
        self.processes.append(process)
        return process

    def stop(self) -> None:
        """Stop every process of this control plane, newest first."""
        while self.processes:
            self.processes.pop().stop()


def start_control_plane(
    bin_dir: Path, etcd: Etcd, workdir: Path, etcd_prefix: str = "/registry"
) -> ControlPlane:
    """Start kube-apiserver on a free port against `etcd` under `etcd_prefix`; wait for
    /readyz; write an admin kubeconfig (bearer token, the throwaway CA)."""
    workdir.mkdir(parents=True, exist_ok=True)
    pki_dir = workdir / "pki"
    pki_dir.mkdir(exist_ok=True)
    pki = write_pki(pki_dir)
    token = secrets.token_hex(16)
    tokens = pki_dir / "tokens.csv"
    tokens.write_text(f'{token},chaos-admin,chaos-admin-uid,"system:masters"\n')
    tokens.chmod(0o600)
    port = free_port()
    server = f"https://127.0.0.1:{port}"
    argv = [
        str(bin_dir / "kube-apiserver"),
        f"--etcd-servers={etcd.url}",
        f"--etcd-prefix={etcd_prefix}",
        f"--secure-port={port}",
        "--bind-address=127.0.0.1",
        "--advertise-address=127.0.0.1",
        f"--cert-dir={pki_dir}",
        f"--tls-cert-file={pki['cert']}",
        f"--tls-private-key-file={pki['key']}",
        f"--client-ca-file={pki['ca']}",
        f"--token-auth-file={tokens}",
        "--authorization-mode=RBAC",
        "--service-cluster-ip-range=10.0.0.0/24",
        f"--service-account-issuer={server}",
        f"--service-account-key-file={pki['sa']}",
        f"--service-account-signing-key-file={pki['sa']}",
        "--disable-admission-plugins=ServiceAccount",
        "--allow-privileged=true",
        "--enable-priority-and-fairness=false",
        "--profiling=false",
        "--v=1",
    ]
    process = Process("kube-apiserver", argv, workdir / "kube-apiserver.log").start()
    context = ssl.create_default_context(cafile=str(pki["ca"]))
    try:
        process.wait_until(lambda: _http_ok(f"{server}/readyz", context, token), "200 on /readyz")
    except BaseException:
        process.stop()
        raise
    kubeconfig = workdir / "kubeconfig"
    kubeconfig.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [
                    {
                        "name": "chaos-test",
                        "cluster": {"server": server, "certificate-authority": str(pki["ca"])},
                    }
                ],
                "users": [{"name": "chaos-admin", "user": {"token": token}}],
                "contexts": [
                    {
                        "name": "chaos-test",
                        "context": {
                            "cluster": "chaos-test",
                            "user": "chaos-admin",
                            "namespace": "default",
                        },
                    }
                ],
                "current-context": "chaos-test",
            }
        )
    )
    kubeconfig.chmod(0o600)
    return ControlPlane(
        server=server,
        kubeconfig=kubeconfig,
        token=token,
        ca_file=pki["ca"],
        bin_dir=bin_dir,
        workdir=workdir,
        etcd_prefix=etcd_prefix,
        processes=[process],
    )


def crd_files() -> list[Path]:
    """The generated CRDs committed in crds/."""
    return sorted((REPO / "crds").glob("*.yaml"))


def install_crds(plane: ControlPlane) -> list[str]:
    """Apply crds/*.yaml and wait until each is Established; returns the CRD names."""
    names = []
    for path in crd_files():
        plane.kubectl("apply", "-f", str(path))
        names.append(yaml.safe_load(path.read_text())["metadata"]["name"])
    plane.kubectl(
        "wait", "--for=condition=Established", "--timeout=120s", *(f"crd/{n}" for n in names)
    )
    return names


def poll(check: Callable[[], Any], what: str, timeout: float = 60.0) -> Any:
    """Call `check` until it returns something truthy (which is returned); bounded."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise TimeoutError(f"no {what} within {timeout:.0f} s")
        time.sleep(0.5)


@contextlib.contextmanager
def control_plane_on(
    bin_dir: Path, etcd: Etcd, workdir: Path, etcd_prefix: str
) -> Iterator[ControlPlane]:
    """A control plane for the duration of a `with` block."""
    plane = start_control_plane(bin_dir, etcd, workdir, etcd_prefix)
    try:
        yield plane
    finally:
        plane.stop()
