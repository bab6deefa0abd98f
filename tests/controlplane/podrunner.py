"""A test-only kubelet: runs the pods of one namespace as local processes.

It polls the pods of a namespace on a real API server (a list every `interval`; simpler
than a watch and it cannot miss a deletion) and for each new pod:

* lays out a directory per pod and one per volume, and maps the pod's paths into them
  (`chaos_cli.local.localpods`, which the local backend of `chaos run FILE` uses too); a
  PersistentVolumeClaim is `<workdir>/claims/<claim name>`, shared and kept across pods; a
  `secret` volume gets the Secret's data as files: like the kubelet, it starts no pod before
  every Secret it mounts exists, and it updates the files of a running pod when the Secret
  changes (read again every `SECRET_SYNC_S`, each file swapped in whole by a rename);
* projects the downwardAPI files again whenever the pod's annotations change, as the
  kubelet does (the operator orders a warm spare to join that way);
* starts every container's `command + args` as a local process group: `chaos` becomes this
  checkout's `.venv/bin/chaos`;
* writes the pod status back: phase `Running`, `podIP` 127.0.0.1 (every pod shares the
  loopback address; the operator, started with `--pod-host 127.0.0.1`, gives every member
  distinct ports), `Ready` conditions; when a container exits the others are stopped and the
  pod ends `Succeeded` (all exit 0) or `Failed`.

A pod that disappears or gets a `deletionTimestamp` has its processes stopped: SIGTERM to the
group, SIGKILL after the pod's `terminationGracePeriodSeconds` (at most 60 s), without holding
up the other pods meanwhile. Logs: `<workdir>/<pod>/<container>.log`.
"""

from __future__ import annotations

import base64
import contextlib
import os
import signal
import subprocess
import threading
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from chaos_cli.local import localpods
from chaos_operator.federation.identity import write_file
from kubernetes import client, config
from kubernetes.client.exceptions import ApiException

from tests.controlplane.plane import REPO, _die_with_parent

POD_IP = "127.0.0.1"
MAX_GRACE_S = 60.0  # the pod's terminationGracePeriodSeconds, capped
SECRET_SYNC_S = 1.0  # how often a running pod's Secrets are read again


@dataclass
class RunningPod:
    """The processes of one pod."""

    name: str
    uid: str
    directory: Path
    volumes: dict[str, Path] = field(default_factory=dict)
    annotations: dict[str, str] = field(default_factory=dict)
    """As last projected into its downwardAPI files."""
    processes: dict[str, subprocess.Popen] = field(default_factory=dict)
    grace_s: float = MAX_GRACE_S
    ended: bool = False
    kill_at: float | None = None
    secrets: dict[str, dict[str, bytes]] = field(default_factory=dict)
    """Secret name -> the data its files hold now."""
    secret_dirs: dict[str, tuple[Path, int]] = field(default_factory=dict)
    """Secret name -> (the directory of its volume, the files' mode)."""
    secrets_read_at: float = 0.0

    def alive(self) -> list[int]:
        return [p.pid for p in self.processes.values() if p.poll() is None]

    def terminate(self, grace_s: float) -> None:
        """SIGTERM every container's process group (once); SIGKILL is due `grace_s` later."""
        if self.kill_at is not None:
            return
        self.kill_at = time.monotonic() + grace_s
        for proc in self.processes.values():
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGTERM)

    def reaped(self) -> bool:
        """After `terminate`: True once every process is gone, SIGKILLing them when the grace
        period is over; False while they may still exit on their own."""
        assert self.kill_at is not None
        if self.alive() and time.monotonic() < self.kill_at:
            return False
        for proc in self.processes.values():
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        return True

    def stop(self, grace_s: float) -> None:
        """`terminate`, then wait (blocking) until `reaped`."""
        self.terminate(grace_s)
        while not self.reaped():
            time.sleep(0.05)


class PodRunner:
    """Plays the kubelet for the pods of `namespace` (see the module docstring)."""

    def __init__(
        self,
        kubeconfig: Path,
        namespace: str,
        workdir: Path,
        *,
        env: dict[str, str] | None = None,
        interval: float = 0.25,
    ) -> None:
        self.namespace = namespace
        self.workdir = workdir
        # workers log what they do, so that a failure's diagnosis has the pods' story
        self.env = {"CHAOS_LOG_LEVEL": "INFO", **os.environ, **(env or {})}
        self.interval = interval
        self.core = client.CoreV1Api(config.new_client_from_config(config_file=str(kubeconfig)))
        self._serializer = client.ApiClient()
        self.pods: dict[str, RunningPod] = {}
        self.errors: list[str] = []
        self.exits: dict[str, dict[str, int | None]] = {}
        """Pod name -> container -> exit code, for pods stopped because they were deleted."""
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="podrunner", daemon=True)
        self._lock = threading.Lock()

    def start(self) -> PodRunner:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop polling and every process still running."""
        self._stop.set()
        self._thread.join(30)
        with self._lock:
            for pod in self.pods.values():
                pod.stop(1.0)

    def alive(self) -> dict[str, list[int]]:
        """Pod name -> pids of its processes still running."""
        with self._lock:
            return {name: pids for name, pod in self.pods.items() if (pids := pod.alive())}

    def log(self, pod: str, container: str = "trainer") -> str:
        path = self.workdir / pod / f"{container}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    # ------------------------------------------------------------------------ loop

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self._tick()
            except Exception as exc:  # keep running; the test reads `errors` on failure
                self.errors.append(f"{type(exc).__name__}: {exc}")
            self._stop.wait(self.interval)

    def _tick(self) -> None:
        items = self.core.list_namespaced_pod(self.namespace).items
        present = {p.metadata.uid: p for p in items}
        with self._lock:
            known = dict(self.pods)
        for name, running in known.items():
            pod = present.get(running.uid)
            if pod is None or pod.metadata.deletion_timestamp is not None:
                running.terminate(running.grace_s)  # the loop goes on while they leave
                if not running.reaped():
                    continue
                self.exits[name] = {c: p.returncode for c, p in running.processes.items()}
                with self._lock:
                    del self.pods[name]
                if pod is not None:  # graceful deletion: confirm, as the kubelet does
                    with contextlib.suppress(ApiException):
                        self.core.delete_namespaced_pod(
                            name, self.namespace, grace_period_seconds=0
                        )
            elif not running.ended:
                self._refresh(running, pod)
                self._check_exit(running)
                self._refresh_secrets(running)
        for pod in items:
            if pod.metadata.deletion_timestamp is not None or pod.metadata.name in known:
                continue
            if (pod.status and pod.status.phase) in ("Succeeded", "Failed"):
                continue
            self._start(pod)

    # ---------------------------------------------------------------------- starting

    def _secrets(self, body: dict[str, Any]) -> dict[str, dict[str, bytes]] | None:
        """Secret name -> key -> bytes of every Secret the pod mounts; None while one is
        missing."""
        out: dict[str, dict[str, bytes]] = {}
        for volume in body["spec"].get("volumes") or ():
            name = (volume.get("secret") or {}).get("secretName")
            if not name:
                continue
            try:
                secret = self.core.read_namespaced_secret(name, self.namespace)
            except ApiException as exc:
                if exc.status == 404:
                    return None
                raise
            out[name] = {k: base64.b64decode(v) for k, v in (secret.data or {}).items()}
        return out

    def _refresh_secrets(self, running: RunningPod) -> None:
        """Update the files of the Secrets a running pod mounts that changed (as the kubelet
        does, within its sync period)."""
        if not running.secret_dirs or time.monotonic() - running.secrets_read_at < SECRET_SYNC_S:
            return
        running.secrets_read_at = time.monotonic()
        for name, (directory, mode) in running.secret_dirs.items():
            try:
                data = self.core.read_namespaced_secret(name, self.namespace).data or {}
            except ApiException:
                continue
            now = {k: base64.b64decode(v) for k, v in data.items()}
            if now == running.secrets.get(name):
                continue
            for key, value in now.items():
                fresh = directory / f".{key}.new"
                write_file(fresh, value, mode)
                os.replace(fresh, directory / key)
            running.secrets[name] = now

    def _start(self, pod: client.V1Pod) -> None:
        meta, spec = pod.metadata, pod.spec
        directory = self.workdir / meta.name
        body = self._serializer.sanitize_for_serialization(pod)
        secrets = self._secrets(body)
        if secrets is None:  # tried again on the next round
            return
        volumes = localpods.lay_out(body, directory, secrets, claims=self.workdir / "claims")
        running = RunningPod(
            meta.name,
            meta.uid,
            directory,
            volumes,
            dict(meta.annotations or {}),
            grace_s=min(float(spec.termination_grace_period_seconds or 30), MAX_GRACE_S),
        )
        running.secrets = secrets
        for volume in body["spec"].get("volumes") or ():
            if name := (volume.get("secret") or {}).get("secretName"):
                mode = volume["secret"].get("defaultMode", 0o644)
                running.secret_dirs[name] = (volumes[volume["name"]], mode)
        with self._lock:
            self.pods[meta.name] = running
        for container in body["spec"]["containers"]:
            argv = localpods.command(container, volumes, str(REPO / ".venv" / "bin" / "chaos"))
            env = {**self.env, **localpods.container_env(container, volumes)}
            log = directory / f"{container['name']}.log"
            with log.open("ab") as out:
                running.processes[container["name"]] = subprocess.Popen(
                    argv,
                    cwd=directory,
                    env=env,
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                    preexec_fn=_die_with_parent,
                )
        now = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        conditions = [
            {"type": t, "status": "True", "lastTransitionTime": now}
            for t in ("PodScheduled", "Initialized", "ContainersReady", "Ready")
        ]
        self._patch_status(
            meta.name,
            {
                "phase": "Running",
                "podIP": POD_IP,
                "podIPs": [{"ip": POD_IP}],
                "hostIP": POD_IP,
                "startTime": now,
                "conditions": conditions,
            },
        )

    def _refresh(self, running: RunningPod, pod: client.V1Pod) -> None:
        """Project the pod's downwardAPI files again when its annotations changed (how the
        kubelet delivers a warm spare's order to join)."""
        annotations = dict(pod.metadata.annotations or {})
        if annotations == running.annotations:
            return
        body = self._serializer.sanitize_for_serialization(pod)
        localpods.project(body, running.directory, running.volumes)
        running.annotations = annotations

    # ------------------------------------------------------------------------ ending

    def _check_exit(self, running: RunningPod) -> None:
        codes = {name: p.poll() for name, p in running.processes.items()}
        if all(code is None for code in codes.values()):
            return
        running.terminate(running.grace_s)  # one container ended: stop the others
        if not running.reaped():
            return
        codes = {name: p.returncode for name, p in running.processes.items()}
        first = next(code for code in codes.values() if code is not None)
        phase = (
            "Succeeded" if first == 0 and all(c in (0, -15) for c in codes.values()) else "Failed"
        )
        running.ended = True
        now = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        statuses = [
            {
                "name": name,
                "ready": False,
                "restartCount": 0,
                "image": name,
                "imageID": "",
                "state": {"terminated": self._terminated(running, name, code, now)},
            }
            for name, code in codes.items()
        ]
        conditions = [
            {"type": "Ready", "status": "False", "lastTransitionTime": now},
            {"type": "ContainersReady", "status": "False", "lastTransitionTime": now},
        ]
        self._patch_status(
            running.name,
            {"phase": phase, "conditions": conditions, "containerStatuses": statuses},
        )

    @staticmethod
    def _terminated(running: RunningPod, container: str, code: int, now: str) -> dict[str, Any]:
        """A container's `terminated` state, with its termination message as a kubelet
        copies it (at most 4096 bytes)."""
        state: dict[str, Any] = {"exitCode": code, "finishedAt": now}
        path = localpods.termination_log(running.directory, container)
        if path.exists():
            state["message"] = path.read_text(errors="replace")[:4096]
        return state

    def _patch_status(self, name: str, status: dict[str, Any]) -> None:
        try:
            self.core.patch_namespaced_pod_status(name, self.namespace, {"status": status})
        except ApiException as exc:
            if exc.status != 404:
                raise
