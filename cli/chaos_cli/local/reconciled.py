"""Local process backend of `chaos run FILE`: a ChaosJob reconciled into local processes.

The same pure `reconcile()` the operator applies to Kubernetes, applied to processes on this
machine: `LocalPods` is the `PodBackend` of this run, and the operator's own `apply_plan`
carries out each plan on it. Every supervision round of the launcher (`ReconciledJob`, a
`LocalRun`) observes the job's local pods, reconciles and applies the plan:

* **observe**: a pod is `Running` while its process lives, then `Succeeded` (exit 0) or
  `Failed` once the process has ended and every record it sent has been taken in;
* **create**: the pod's volumes become directories and its paths are mapped into them
  (`localpods`); the trainer container's `chaos worker --config FILE` runs with the config
  projected from the pod's annotation, plus what a pod does not say: the launcher's control
  channel, `--dtype`, `--device`, link shaping and join options (and no metrics port unless
  `--metrics`). Addresses are `127.0.0.1` with ports from a free base port. The replicator
  container is not started: the trainer starts its own replicator process instead, and
  that is the address members advertise;
* **delete**: a live member is told to leave at an agreed step (what a pod's SIGTERM does
  in a cluster) and killed if it is still there after the pod's grace period; an ended one
  is simply forgotten.

Churn (`--churn`, member names `w<ordinal>` stand for the pods `<job>-w<ordinal>`):
`crash`/`hang` act on the process as in a plain run, and the reconcile replaces a crashed
member with a new one that joins through a live member; a hung one is left alone, as a
pod with no liveness probe would be. `join` scales out (`spec.replicas` + 1, as
`kubectl scale`), `leave:wK` deletes wK's pod and scales in by one, so wK leaves gracefully
and is not replaced. Link events go to both ends, as in a plain run.

Warm spares: every member the schedule will make the reconcile create is started in
standby when the job starts, under the name and address the reconcile will give it, and
is handed its pod when the plan creates it (it then joins through the plan's seed). Like a
node with the image already pulled, this keeps interpreter and torch start-up out of the
scale-out time (the plain run does the same with its joiners). A pod with no matching
spare gets a fresh process.
"""

from __future__ import annotations

import contextlib
import json
import random
import re
import signal
import time
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from chaos_operator.api import ChaosJob, ChaosJobStatus
from chaos_operator.api.chaosjob import NAME_PATTERN
from chaos_operator.controller import PodBackend, apply_plan
from chaos_operator.pods import (
    ANN_NEXT_MEMBER,
    PORTS_PER_MEMBER,
    Options,
    job_bucket_bytes,
    job_meta,
    member_name,
    merge_template,
    worker_config,
    worker_pod,
)
from chaos_operator.reconcile import ObservedPod, PodEvent, reconcile
from chaos_worker.config import WorkerConfig
from pydantic import ValidationError

from chaos_cli.errors import UserError
from chaos_cli.local import localpods
from chaos_cli.local.churn import ChurnEvent
from chaos_cli.local.launcher import MAX_WORKERS, JobOptions, LaunchError, LocalRun, free_ports
from chaos_cli.validation import describe_validation_error
from chaos_cli.yamlfile import read_yaml

POD_HOST = "127.0.0.1"
SPARE_ORDINALS = 8
"""Ordinals whose ports are reserved past the expected ones, for unscheduled replacements."""
LOW_PORTS = (20000, 32000)
"""Where a free base port is looked for: below Linux's usual ephemeral range."""
MAX_NAME = 57
"""The longest job name whose member names `<name>-w<nnnn>` still fit a 63-letter label."""
UNKNOWN_SEED = "0.0.0.0:0"
"""The join address in a warm spare's pod: its seed is only known when the plan creates it."""


def load_manifest(path: str) -> ChaosJob:
    """The ChaosJob in the YAML file `path`, as a fresh job (no status, ids from 0).

    Raises UserError with one line that names the problem (and the field).
    """
    body = read_yaml(path)
    if not isinstance(body, dict):
        raise UserError(f"{path}: not a ChaosJob manifest (expected a YAML mapping)")
    try:
        # Strict, as the API server's schema: `globalBatch: "64"` is no integer. Its status is
        # left out, as the API server ignores it on create (the status subresource).
        job = ChaosJob.model_validate({k: v for k, v in body.items() if k != "status"}, strict=True)
    except ValidationError as exc:
        raise UserError(f"{path}: {describe_validation_error(exc)}") from None
    name = job.metadata.name
    if not name:
        raise UserError(f"{path}: metadata.name: is required")
    if len(name) > MAX_NAME or not re.fullmatch(NAME_PATTERN, name):
        raise UserError(
            f"{path}: metadata.name: must be a lowercase DNS label of at most {MAX_NAME} "
            f"characters (letters, digits, '-'), not {name!r}"
        )
    if job.spec.spares:
        raise UserError(
            f"{path}: spec.spares: is for the operator; chaos run FILE starts a spare for every "
            "member its schedule makes already (set it to 0 or leave it out)"
        )
    if not 1 <= job.spec.replicas <= MAX_WORKERS:
        raise UserError(f"{path}: spec.replicas: must lie in 1..{MAX_WORKERS} to run locally")
    annotations = {k: v for k, v in job.metadata.annotations.items() if k != ANN_NEXT_MEMBER}
    meta = job.metadata.model_copy(
        update={"annotations": annotations, "generation": 1, "namespace": "default"}
    )
    return job.model_copy(update={"metadata": meta, "status": None})


def trainer_env(job: ChaosJob, directory: Path) -> dict[str, str]:
    """The environment the job's pod template gives its trainers, for a pod laid out under
    `directory` (the entry check loads the factory with it, as a worker will)."""
    if job.spec.template is None:
        return {}
    bare = {
        "metadata": {"labels": {}, "annotations": {}},
        "spec": {"containers": [{"name": "trainer"}], "volumes": []},
    }
    pod = merge_template(bare, job.spec.template.to_k8s())
    volumes = localpods.lay_out(pod, directory)
    return localpods.container_env(localpods.find_container(pod, "trainer"), volumes)


def pod_churn(job: ChaosJob, events: list[ChurnEvent]) -> list[ChurnEvent]:
    """`events` (parsed with `reconciled=True`) with worker names turned into pod names.

    Raises UserError when a join or a leave would take `spec.replicas` out of its bounds.
    """
    spec, name = job.spec, job.metadata.name or ""
    replicas = spec.replicas
    out = []
    for event in events:
        replicas += {"join": 1, "leave": -1}.get(event.kind, 0)
        bound = (
            f"maxReplicas ({spec.max_replicas})"
            if replicas > spec.max_replicas
            else f"minReplicas ({spec.min_replicas})"
            if replicas < spec.min_replicas
            else ""
        )
        if bound:
            raise UserError(
                f"--churn: {event.label} would take spec.replicas to {replicas}, past {bound}"
            )
        out.append(
            replace(
                event,
                worker=_pod_name(name, event.worker),
                peer=_pod_name(name, event.peer) if event.peer else "",
            )
        )
    return out


def _pod_name(job: str, worker: str) -> str:
    return f"{job}-{worker}"


def expected_creations(events: list[ChurnEvent]) -> int:
    """Members the reconcile will create after the initial set: one per crash and join."""
    return sum(1 for e in events if e.kind in ("crash", "join"))


def base_port_for(options: JobOptions, base: int = 0) -> int:
    """A free base port for the members this run expects (`pick_base_port`)."""
    ordinals = options.workers + expected_creations(options.churn) + SPARE_ORDINALS
    return pick_base_port(ordinals, base, metrics=options.metrics)


def pick_base_port(ordinals: int, base: int = 0, *, metrics: bool = False) -> int:
    """A base port such that every member's trainer port (and metrics port) is free now.

    `base` given: that one or LaunchError naming the taken port; else a random free one
    below the ephemeral range, so that outgoing connections do not take ours meanwhile.
    """

    def check(b: int) -> None:
        for n in range(ordinals):
            free_ports(2 if metrics else 1, b + PORTS_PER_MEMBER * n)

    if base:
        if base + PORTS_PER_MEMBER * ordinals > 65535:
            raise LaunchError(f"--base-port {base} leaves no room for {ordinals} members")
        check(base)
        return base
    for _ in range(50):
        candidate = random.randrange(LOW_PORTS[0], LOW_PORTS[1] - PORTS_PER_MEMBER * ordinals)
        try:
            check(candidate)
        except LaunchError:
            continue
        return candidate
    raise LaunchError("no free range of ports on 127.0.0.1 for the members")


@dataclass
class LocalPod:
    """A pod of the plan that this backend runs."""

    body: dict[str, Any]
    deleting_since: float | None = None


class LocalPods(PodBackend):
    """The `PodBackend` of `chaos run FILE`: the one job (this run's API server) and its pods
    as processes of `run` (see the module docstring)."""

    def __init__(self, run: LocalRun, job: ChaosJob, options: Options) -> None:
        self.run = run
        self.job = job
        self.options = options
        self.pods: dict[str, LocalPod] = {}
        self.spares: dict[str, dict[str, Any]] = {}
        """Name -> trainer config of a warm spare not yet handed a pod."""
        self._join_orders: dict[str, str] = {}  # spare -> seed, not yet delivered

    # ------------------------------------------------------------- the PodBackend

    def list_jobs(self) -> list[tuple[str, str]]:
        name, namespace, _ = job_meta(self.job)
        return [(namespace, name)]

    def get_job(self, namespace: str, name: str) -> ChaosJob | None:
        return self.job if (namespace, name) in self.list_jobs() else None

    def observe(self, job: ChaosJob) -> list[ObservedPod]:
        return [self._observe(name, pod) for name, pod in self.pods.items()]

    def set_next_member(self, job: ChaosJob, ordinal: int) -> None:
        job.metadata.annotations[ANN_NEXT_MEMBER] = str(ordinal)

    def ensure_service(self, job: ChaosJob, body: dict[str, Any]) -> None:
        """Nothing to do: members are addressed on 127.0.0.1 with distinct ports."""

    def ensure_claim(self, job: ChaosJob, body: dict[str, Any]) -> None:
        """Nothing to do: a claim is the directory `<run dir>/claims/<name>` of this run."""

    def create(self, job: ChaosJob, body: dict[str, Any]) -> bool:
        name = body["metadata"]["name"]
        config, env = self._trainer_config(body)
        self.pods[name] = LocalPod(body)
        if config.get("join"):
            self._note_join(name)
        spare = self.spares.pop(name, None)
        proc = self.run.procs.get(name)
        alive = proc is not None and proc.popen.poll() is None
        if spare is not None and alive and config.get("join") and _same_but_join(spare, config):
            self._join_orders[name] = str(config["join"])
            self._deliver_join_orders()
            return True
        if spare is not None and proc is not None:  # unfit for this pod: a fresh process
            self._kill(name)
        self.run.launch(name, self._local_config(config), env=env)
        return True

    def delete(self, job: ChaosJob, name: str) -> bool:
        pod = self.pods.get(name)
        proc = self.run.procs.get(name)
        if pod is None:
            return False
        if proc is None or proc.popen.poll() is not None:
            del self.pods[name]  # nothing runs: the pod is simply gone
        elif pod.deleting_since is None:
            pod.deleting_since = time.monotonic()
            self.run.command(name, {"cmd": "leave"})  # a pod's SIGTERM: leave at an agreed step
        return True

    def activate(self, job: ChaosJob, name: str, patch: dict[str, Any]) -> bool:
        """Never called: a manifest run has no spare pods (`load_manifest` refuses
        `spec.spares`; its warm spares are processes, handed pods by `create`)."""
        return False

    def post_event(self, job: ChaosJob, event: PodEvent) -> None:
        self.run.last_event = f"{event.reason}: {event.message}"

    def patch_status(self, job: ChaosJob, status: dict[str, Any]) -> None:
        job.status = ChaosJobStatus.model_validate(status)

    def _observe(self, name: str, pod: LocalPod) -> ObservedPod:
        meta = pod.body["metadata"]
        proc = self.run.procs.get(name)
        code = proc.popen.poll() if proc else None
        connected = self.run.connected(name)
        phase = "Running"
        # Ended once its records are all in, so that its last step counts before its exit.
        if code is not None and (name in self.run.disconnected or not connected):
            phase = "Succeeded" if code == 0 else "Failed"
        return ObservedPod(
            name=name,
            phase=phase,
            labels=meta["labels"],
            annotations=meta["annotations"],
            ready=phase == "Running" and connected,
            deleting=pod.deleting_since is not None,
        )

    # ------------------------------------------------------------ what a cluster does

    def tick(self) -> None:
        """One supervision round: hand spares their seeds, end deletions past their grace."""
        self._deliver_join_orders()
        self._finish_deletions()

    def scale(self, delta: int) -> None:
        """What `kubectl scale` does: a new spec.replicas and generation."""
        self.job.spec.replicas += delta
        self.job.metadata.generation = (self.job.metadata.generation or 0) + 1

    def start_spares(self, count: int) -> None:
        """Start the next `count` members the reconcile will create, in standby."""
        first = self.job.spec.replicas
        for ordinal in range(first, first + count):
            self._start_spare(ordinal)

    def _finish_deletions(self) -> None:
        for name, pod in list(self.pods.items()):
            if pod.deleting_since is None:
                continue
            proc = self.run.procs[name]
            if proc.popen.poll() is not None:
                del self.pods[name]
            elif time.monotonic() - pod.deleting_since > _grace_s(pod.body):
                self._kill(name)

    def _kill(self, name: str) -> None:
        proc = self.run.procs[name]
        proc.killed = True
        with contextlib.suppress(ProcessLookupError):
            proc.popen.send_signal(signal.SIGKILL)
        proc.popen.wait()

    def _note_join(self, name: str) -> None:
        """A replacement the reconcile made (not a scheduled join) shows in the report too."""
        fired = self.run.timeline.fired
        if not any(f.event.kind == "join" and f.event.worker == name for f in fired):
            self.run.note_fired(ChurnEvent("join", max(self.run.max_step, 0), name))

    # ------------------------------------------------------------------ processes

    def _trainer_config(self, body: dict[str, Any]) -> tuple[dict[str, Any], dict[str, str]]:
        """Lay the pod out; the config its trainer would be started with, and the
        environment its template gives the trainer (paths mapped)."""
        name = body["metadata"]["name"]
        run_dir = self.run.run_dir
        volumes = localpods.lay_out(body, run_dir / "pods" / name, claims=run_dir / "claims")
        trainer = localpods.find_container(body, "trainer")
        argv = localpods.command(trainer, volumes, "chaos")
        if len(argv) != 4 or argv[:3] != ["chaos", "worker", "--config"]:
            raise LaunchError(f"pod {name}: the trainer does not run `chaos worker --config`")
        return json.loads(Path(argv[3]).read_text()), localpods.container_env(trainer, volumes)

    def _local_config(self, config: dict[str, Any], **extra: Any) -> WorkerConfig:
        """The pod's config plus what only this machine knows (module docstring)."""
        # no sidecar runs here: the trainer starts its own replicator process instead
        drop = ("id", "listen", "replicator_address")
        fields = {k: v for k, v in config.items() if k not in drop}
        if not self.run.opts.metrics:
            fields["metrics_port"] = None
        return self.run.worker_config(config["id"], listen=config["listen"], **fields, **extra)

    def _start_spare(self, ordinal: int) -> None:
        config = worker_config(self.job, ordinal, self.options, join=UNKNOWN_SEED)
        body = worker_pod(self.job, ordinal, config)
        name = member_name(self.job.metadata.name or "", ordinal)
        mapped, env = self._trainer_config(body)
        self.spares[name] = mapped
        # in standby until the plan creates its pod; the join command then names the seed
        config = self._local_config({**mapped, "join": None}, standby=True)
        self.run.launch(name, config, env=env)

    def _deliver_join_orders(self) -> None:
        if not self._join_orders:
            return
        standby = {r["worker"] for r in self.run.timeline.of("standby")}
        for name, seed in list(self._join_orders.items()):
            if name in standby and self.run.command(name, {"cmd": "join", "seed": seed}):
                del self._join_orders[name]


class ReconciledJob(LocalRun):
    """`chaos run FILE`: the launcher driven by the reconcile, whose plans `apply_plan`
    carries out on `LocalPods`, as the operator does on Kubernetes."""

    def __init__(self, job: ChaosJob, options: JobOptions, *, base_port: int, on_update=None):
        super().__init__(options, on_update=on_update)
        pod_options = Options(
            base_port=base_port,
            pod_host=POD_HOST,
            steps=options.steps,
            heartbeat_interval_s=options.heartbeat_interval_s,
            failure_timeout_s=options.failure_timeout_s,
        )
        self.pods = LocalPods(self, job, pod_options)

    def _start(self) -> None:
        self.pods.start_spares(expected_creations(self.opts.churn))
        self._reconcile()

    def initial_members(self) -> list[str]:
        job = self.pods.job
        return [member_name(job.metadata.name or "", i) for i in range(self.opts.workers)]

    def newcomers(self) -> set[str]:
        """The members the reconcile creates after the initial set: one per join and one
        replacing each crashed member, named in the order it creates them."""
        first, name = self.opts.workers, self.pods.job.metadata.name or ""
        added = expected_creations(self.opts.churn)
        return {member_name(name, i) for i in range(first, first + added)}

    def _tick(self) -> None:
        self.pods.tick()
        self._reconcile()

    def _reconcile(self) -> None:
        job = self.pods.job
        step = self.max_step if self.max_step >= 0 else None
        observed = self.pods.observe(job)
        plan = reconcile(
            job, observed, now=datetime.now(UTC), current_step=step, options=self.pods.options
        )
        apply_plan(job, plan, self.pods)

    def _inject(self, event: ChurnEvent) -> None:
        if event.kind == "join":
            self.pods.scale(+1)
        elif event.kind == "leave":
            # first, so that the reconcile removes no other member
            self.pods.delete(self.pods.job, event.worker)
            self.pods.scale(-1)
        else:
            super()._inject(event)


def _same_but_join(a: dict[str, Any], b: dict[str, Any]) -> bool:
    return {k: v for k, v in a.items() if k != "join"} == {
        k: v for k, v in b.items() if k != "join"
    }


def _grace_s(body: dict[str, Any]) -> float:
    return float(body["spec"].get("terminationGracePeriodSeconds", 30))


def run_options(job: ChaosJob) -> dict[str, Any]:
    """The `JobOptions` fields a manifest sets."""
    return {
        "workers": job.spec.replicas,
        "entry": job.spec.entry,
        "global_batch": job.spec.global_batch,
        "seed": job.spec.seed,
        **({"steps": job.spec.steps} if job.spec.steps is not None else {}),
        **({"bucket_bytes": job_bucket_bytes(job)} if job.spec.bucket_kib is not None else {}),
        **({"micro_batch": job.spec.micro_batch} if job.spec.micro_batch is not None else {}),
    }
