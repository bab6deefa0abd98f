"""A test-only kubelet: runs the pods of one namespace as local processes.

It polls the pods of a namespace on a real API server (a list every `interval`; simpler
than a watch and it cannot miss a deletion) and for each new pod:

* makes a directory per pod and one per volume: `emptyDir` is a plain directory,
  `downwardAPI` items with `metadata.annotations['…']`, `metadata.name` or
  `metadata.namespace` field references are written as files;
* starts every container's `command + args` as a local process group: `chaos` becomes this
  checkout's `.venv/bin/chaos`, and absolute paths under a volume mount (in arguments and in
  JSON files it projects) become the pod's directories, as if each pod had its own root;
* writes the pod status back: phase `Running`, `podIP` 127.0.0.1 (every pod shares the
  loopback address; the operator, started with `--pod-host 127.0.0.1`, gives every member
  distinct ports), `Ready` conditions; when a container exits the others are stopped and the
  pod ends `Succeeded` (all exit 0) or `Failed`.

A pod that disappears or gets a `deletionTimestamp` has its processes stopped: SIGTERM to the
group, SIGKILL after its grace period (capped). Logs: `<workdir>/<pod>/<container>.log`.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import threading
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from kubernetes import client, config
from kubernetes.client.exceptions import ApiException

from tests.controlplane.plane import REPO, _die_with_parent

POD_IP = "127.0.0.1"
MAX_GRACE_S = 5.0
FIELD = re.compile(r"^metadata\.annotations\['(?P<key>[^']+)'\]$")


@dataclass
class RunningPod:
    """The processes of one pod."""

    name: str
    uid: str
    directory: Path
    processes: dict[str, subprocess.Popen] = field(default_factory=dict)
    grace_s: float = MAX_GRACE_S
    ended: bool = False

    def alive(self) -> list[int]:
        return [p.pid for p in self.processes.values() if p.poll() is None]

    def stop(self, grace_s: float) -> None:
        """SIGTERM every container's process group, then SIGKILL the stragglers."""
        for proc in self.processes.values():
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        for proc in self.processes.values():
            try:
                proc.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


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
        self.env = {**os.environ, **(env or {})}
        self.interval = interval
        self.core = client.CoreV1Api(config.new_client_from_config(config_file=str(kubeconfig)))
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
                running.stop(running.grace_s)
                self.exits[name] = {c: p.returncode for c, p in running.processes.items()}
                with self._lock:
                    del self.pods[name]
                if pod is not None:  # graceful deletion: confirm, as the kubelet does
                    with contextlib.suppress(ApiException):
                        self.core.delete_namespaced_pod(
                            name, self.namespace, grace_period_seconds=0
                        )
            elif not running.ended:
                self._check_exit(running)
        for pod in items:
            if pod.metadata.deletion_timestamp is not None or pod.metadata.name in known:
                continue
            if (pod.status and pod.status.phase) in ("Succeeded", "Failed"):
                continue
            self._start(pod)

    # ---------------------------------------------------------------------- starting

    def _start(self, pod: client.V1Pod) -> None:
        meta, spec = pod.metadata, pod.spec
        directory = self.workdir / meta.name
        volumes: dict[str, Path] = {}
        for volume in spec.volumes or ():
            path = directory / "volumes" / volume.name
            path.mkdir(parents=True, exist_ok=True)
            volumes[volume.name] = path
        running = RunningPod(
            meta.name,
            meta.uid,
            directory,
            grace_s=min(float(spec.termination_grace_period_seconds or 30), MAX_GRACE_S),
        )
        with self._lock:
            self.pods[meta.name] = running
        every_mount = {
            m.mount_path: volumes[m.name] for c in spec.containers for m in c.volume_mounts or ()
        }
        for volume in spec.volumes or ():
            if volume.downward_api is not None:
                self._project(pod, volume, volumes[volume.name], every_mount)
        for container in spec.containers:
            mounts = {m.mount_path: volumes[m.name] for m in container.volume_mounts or ()}
            argv = [*(container.command or ()), *(container.args or ())]
            if argv and argv[0] == "chaos":
                argv[0] = str(REPO / ".venv" / "bin" / "chaos")
            argv = [_map_path(a, mounts) for a in argv]
            env = dict(self.env)
            for var in container.env or ():
                if var.value is not None:
                    env[var.name] = var.value
            log = directory / f"{container.name}.log"
            with log.open("ab") as out:
                running.processes[container.name] = subprocess.Popen(
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

    def _project(
        self, pod: client.V1Pod, volume: client.V1Volume, path: Path, mounts: dict[str, Path]
    ) -> None:
        meta = pod.metadata
        for item in volume.downward_api.items or ():
            ref = item.field_ref.field_path if item.field_ref else ""
            if match := FIELD.match(ref):
                value = (meta.annotations or {}).get(match["key"], "")
            elif ref in ("metadata.name", "metadata.namespace"):
                value = getattr(meta, ref.split(".")[1])
            else:
                continue
            with contextlib.suppress(json.JSONDecodeError):
                value = json.dumps(_map_json(json.loads(value), mounts))
            (path / item.path).write_text(value)

    # ------------------------------------------------------------------------ ending

    def _check_exit(self, running: RunningPod) -> None:
        codes = {name: p.poll() for name, p in running.processes.items()}
        if all(code is None for code in codes.values()):
            return
        running.stop(running.grace_s)  # one container ended: stop the others
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
                "state": {"terminated": {"exitCode": code, "finishedAt": now}},
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

    def _patch_status(self, name: str, status: dict[str, Any]) -> None:
        try:
            self.core.patch_namespaced_pod_status(name, self.namespace, {"status": status})
        except ApiException as exc:
            if exc.status != 404:
                raise


def _map_path(value: str, mounts: dict[str, Path]) -> str:
    """An absolute path under a mount point, rewritten to the pod's directory for it."""
    for mount, path in mounts.items():
        if value == mount or value.startswith(mount.rstrip("/") + "/"):
            return str(path) + value[len(mount.rstrip("/")) :]
    return value


def _map_json(value: Any, mounts: dict[str, Path]) -> Any:
    if isinstance(value, str):
        return _map_path(value, mounts)
    if isinstance(value, dict):
        return {k: _map_json(v, mounts) for k, v in value.items()}
    if isinstance(value, list):
        return [_map_json(v, mounts) for v in value]
    return value
