"""Local process backend of `chaos run`: N workers on loopback with injected churn.

The launcher starts one `chaos worker` process per member, listens for their reports on a
control socket (a Unix socket, so that it works across network namespaces), injects the
churn schedule (commands for leave and link events, signals for crashes, new processes for
joins), shows live progress and writes the report. Worker processes die with the launcher
(PR_SET_PDEATHSIG) and are always reaped on exit. With `netns`, every worker runs in a
network namespace of its own, with links shaped by tc (`chaos_cli.local.netns`), torn down at
the end. Unless `tls` is off, the run makes a CA in its private directory and gives every
worker a certificate of its own (`chaos_operator.federation.workerca`): each worker link is
then mutual TLS, a peer being the member its certificate names. Each worker also gets its
admission to the run (named after its private directory), which the run's CA signs: a
certificate of the run's CA alone does not let a process join (`membership/joiners.py`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from chaos_operator.federation.workerca import WorkerCA
from chaos_worker.config import TlsFiles, WorkerConfig
from chaos_worker.net.control import UNIX
from chaos_worker.net.shaping import parse_links
from chaos_worker.priority import die_with_parent

from chaos_cli.local import durable
from chaos_cli.local.churn import PAUSE_TIMEOUTS, ChurnEvent
from chaos_cli.local.errors import LaunchError
from chaos_cli.local.netns import NetnsError, NetnsTestbed
from chaos_cli.local.ports import control_socket, free_ports
from chaos_cli.local.report import Report, links_matrix
from chaos_cli.local.spares import SparePool
from chaos_cli.local.timeline import Fired, Timeline
from chaos_cli.local.verdict import EXPLAINED, problems

GRACE_S = 10.0
MAX_WORKERS = 64
"""The most worker processes a local run starts: its initial workers and its joiners."""
NETNS_PORT = 7000
"""Port every worker listens on in its own namespace (without --base-port)."""
LOCAL_PARTY = "local"
"""The party named in the certificates of a local run's workers."""
KEEP_RUN_DIR = "CHAOS_KEEP_RUN_DIR"
"""Set (to anything) to keep the run's directory of worker configs and stderr logs."""


@dataclass
class JobOptions:
    entry: str
    workers: int = 4
    steps: int = 200
    global_batch: int = 64
    seed: int = 0
    dtype: str = "float32"
    device: str = "cpu"
    churn: list[ChurnEvent] = field(default_factory=list)
    base_port: int = 0
    heartbeat_interval_s: float = 0.1
    failure_timeout_s: float = 1.0
    example: str = ""
    metrics: bool = False  # every worker serves Prometheus /metrics on a free port
    links: str = ""  # emulated link shapes (chaos_worker.net.shaping)
    downlinks: dict[str, float] = field(default_factory=dict)  # worker -> downlink bytes/s
    join_mode: str = "observe"
    join_strategy: str = "greedy"
    join_probe_frames: int = 0  # frames of a newcomer's downlink probe (0: none)
    state_quorum: int = 1  # members whose seals must agree on a newcomer's state
    # end the job once every newcomer has contributed this many steps (benchmarks)
    stop_after_join_steps: int | None = None
    netns: bool = False  # every worker in its own network namespace, rates shaped by tc
    tls: bool = True  # mutual TLS on every worker link, with certificates of the run's CA
    checkpoint_dir: str | None = None  # checkpoints and final state here (local/durable.py)
    checkpoint_every_steps: int | None = 100
    checkpoint_every_s: float | None = None
    checkpoint_keep: int = 3
    resume_from: str | None = None  # the verified checkpoint the initial members start from
    start_step: int = 0  # its step
    spares: int | None = None  # warm spares kept (None: every joiner of the schedule)
    bucket_bytes: int | None = None  # all-reduce bucket (None: the worker's default)
    micro_batch: int | None = None  # samples per forward/backward (None: the worker's default)

    def worker_names(self) -> list[str]:
        return worker_names(self.workers, self.churn)


def worker_names(workers: int, churn: list[ChurnEvent]) -> list[str]:
    """Initial workers, then the joiners in schedule order (the testbed's order)."""
    return [f"w{i}" for i in range(workers)] + [e.worker for e in churn if e.kind == "join"]


@dataclass
class _Proc:
    name: str
    popen: subprocess.Popen
    stderr: Path
    address: str = ""
    killed: bool = False
    stopped: bool = False
    start: str = "member"  # member (initial), spare (started ahead, in standby) or cold
    standby: bool = False  # it reported standby (a spare ready to join)


class LocalRun:
    """One `chaos run`: see the module docstring."""

    def __init__(self, options: JobOptions, on_update=None) -> None:
        self.opts = options
        self.timeline = Timeline()
        self.procs: dict[str, _Proc] = {}
        self.max_step = -1
        self.last_event = ""
        self.members = options.workers
        self.samples_per_s = 0.0
        self.join_progress: dict[str, str] = {}
        self._on_update = on_update
        self._writers: dict[str, asyncio.StreamWriter] = {}
        self._tmp = Path(tempfile.mkdtemp(prefix="chaos-run-"))
        self._control = ""
        self._pending = list(options.churn)
        self._started = time.monotonic()
        self._done_at: float | None = None
        self.metrics_ports: dict[str, int] = {}  # worker -> its /metrics port (metrics on)
        self.digests: dict[str, str] = {}  # worker -> SHA-256 of its final training state
        self.spawned_at: dict[str, float] = {}  # worker -> when its process was started
        self.disconnected: set[str] = set()  # workers whose control connection has closed
        self.testbed: NetnsTestbed | None = None
        self.tc_sent: dict[tuple[str, str], int] = {}  # netns: bytes per shaped link
        self._wakeups: list[asyncio.TimerHandle] = []  # the SIGCONTs of pauses to come
        self._ca: WorkerCA | None = None  # made with the first certificate (tls on)
        self._issued: dict[str, TlsFiles] = {}  # worker -> its certificate files
        self.pool: SparePool | None = None  # the plain run's spares (a subclass: its own)
        self.lost_spares: list[_Proc] = []  # spares that died while waiting
        self._planned: dict[str, str] = {}  # the addresses of the schedule's workers
        self._stopping = False

    async def run(self) -> Report:
        path = control_socket(self._tmp)
        server = await asyncio.start_unix_server(self._serve, path=str(path))
        self._control = f"{UNIX}{path}"
        try:
            self._start()
            await self._supervise()
        finally:
            server.close()
            for wakeup in self._wakeups:
                wakeup.cancel()  # _reap wakes every stopped process
            self._reap()
            self._remove_testbed()
            if path.parent != self._tmp:
                shutil.rmtree(path.parent, ignore_errors=True)
            if not os.environ.get(KEEP_RUN_DIR):
                shutil.rmtree(self._tmp, ignore_errors=True)
        return self._report()

    def stop(self) -> None:
        """End the run at the next supervision round (its report is written as usual)."""
        self._stopping = True

    def _start(self) -> None:
        """Start the initial members, and the spares (by default every joiner of the
        schedule, started now and admitted at its step: start-up apart)."""
        self._planned = addresses = self._addresses()
        initial = self.opts.worker_names()[: self.opts.workers]
        members = {name: addresses[name] for name in initial}
        for name, address in members.items():
            self._spawn(name, listen=address, members=members)
        joiners = [e.worker for e in self.opts.churn if e.kind == "join"]
        size = len(joiners) if self.opts.spares is None else self.opts.spares
        fresh = self.opts.spares is not None and not self.opts.netns  # netns: planned names
        self.pool = SparePool.plan(size, joiners, initial, fresh=fresh)
        self._keep_spares()

    def _keep_spares(self) -> None:
        """Restart spares that died while waiting (no event for the trainers: none of them
        knows a spare), and top the pool up while the job has steps to go."""
        pool = self.pool
        if pool is None:
            return
        for name in list(pool.waiting):
            proc = self.procs[name]
            code = proc.popen.poll()
            if code is not None and code < 0:  # killed by a signal; an error stays an error
                proc.killed = True
                self.lost_spares.append(proc)
                self._writers.pop(name, None)
                pool.lose(name)
        for name in list(pool.joining):
            if self.procs[name].popen.poll() is not None:
                pool.joined(name)
        if self.max_step >= self.opts.steps - 1:
            return
        while (name := pool.next_name()) is not None:
            self._spawn(name, listen=self._address_for(name), standby=True, start="spare")
            pool.started(name)

    def _address_for(self, name: str) -> str:
        return self._planned.get(name) or f"127.0.0.1:{free_ports(1, 0)[0]}"

    def _addresses(self) -> dict[str, str]:
        """host:port for every worker: free ports on 127.0.0.1, or the testbed's addresses."""
        names = self.opts.worker_names()
        if not self.opts.netns:
            ports = free_ports(len(names), self.opts.base_port)
            return {name: f"127.0.0.1:{port}" for name, port in zip(names, ports, strict=True)}
        try:
            self.testbed = NetnsTestbed.create(
                names, parse_links(self.opts.links), self.opts.downlinks
            )
        except NetnsError as exc:
            raise LaunchError(f"--netns: {exc}") from None
        port = self.opts.base_port or NETNS_PORT
        return {name: f"{self.testbed.plan.addresses[name]}:{port}" for name in names}

    def _remove_testbed(self) -> None:
        if self.testbed is not None:
            try:
                self.tc_sent = self.testbed.shaped_bytes()
            except NetnsError as exc:
                print(f"chaos run: {exc}", file=sys.stderr)
            try:
                self.testbed.close()
            except NetnsError as exc:
                print(f"chaos run: {exc}", file=sys.stderr)
            self.testbed = None

    def _tick(self) -> None:
        """Called on every supervision round (a subclass may reconcile here)."""

    def _spawn(
        self, name: str, *, listen: str, members=None, standby=False, join=None, start="member"
    ) -> None:
        config = self.worker_config(
            name, listen=listen, members=members or {}, standby=standby, join=join
        )
        self.launch(name, config)
        self.procs[name].start = start

    def worker_config(self, name: str, *, listen: str, **fields) -> WorkerConfig:
        """The configuration of worker `name` from the job options; `fields` override."""
        values = dict(
            id=name,
            listen=listen,
            entry=self.opts.entry,
            seed=self.opts.seed,
            global_batch=self.opts.global_batch,
            steps=self.opts.steps,
            dtype=self.opts.dtype,
            device=self.opts.device,
            heartbeat_interval_s=self.opts.heartbeat_interval_s,
            failure_timeout_s=self.opts.failure_timeout_s,
            control=self._control,
            links=self.opts.links,
            kernel_shaped=self.opts.netns,
            downlink_bytes_per_s=None if self.opts.netns else self.opts.downlinks.get(name),
            join_mode=self.opts.join_mode,
            join_strategy=self.opts.join_strategy,
            join_probe_frames=self.opts.join_probe_frames,
            state_quorum=self.opts.state_quorum,
            **durable.worker_fields(self.opts),
        )
        if self.opts.bucket_bytes is not None:
            values["bucket_bytes"] = self.opts.bucket_bytes
        if self.opts.micro_batch is not None:
            values["micro_batch"] = self.opts.micro_batch
        values.update(fields)
        if self.opts.tls and values.get("tls") is None:
            values["tls"] = self._certificate(name)
        if "metrics_port" not in fields:
            values["metrics_port"] = free_ports(1, 0)[0] if self.opts.metrics else None
        return WorkerConfig(**values)

    def _certificate(self, name: str) -> TlsFiles:
        """Worker `name`'s certificate files, issued once, in this run's private directory."""
        if name not in self._issued:
            if self._ca is None:
                # the run is the job its workers' admissions name: its private directory's
                self._ca = WorkerCA(self._tmp / "tls", LOCAL_PARTY, job=self._tmp.name)
            self._issued[name] = self._ca.issue(name)
        return self._issued[name]

    def launch(self, name: str, config: WorkerConfig, env: Mapping[str, str] | None = None) -> None:
        """Start one `chaos worker` process with `config` (and `env` added to ours)."""
        if config.metrics_port is not None:
            self.metrics_ports[name] = config.metrics_port
        path = self._tmp / f"{name}.json"
        path.write_text(config.model_dump_json())
        stderr = self._tmp / f"{name}.stderr"
        cmd = [sys.executable, "-m", "chaos_cli.main", "worker", "--config", str(path)]
        if self.testbed is not None:
            cmd = self.testbed.exec_prefix(name) + cmd  # ip execs the worker: same pid
        self.spawned_at[name] = time.monotonic()
        env = {**os.environ, **(env or {}), "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
        with stderr.open("wb") as err:
            popen = subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=err,
                env=env,
                preexec_fn=die_with_parent(),
            )
        self.procs[name] = _Proc(name, popen, stderr)

    async def _supervise(self) -> None:
        while True:
            await asyncio.sleep(0.02)
            self._keep_spares()
            self._fire_due()
            self._tick()
            failed = [
                p for p in self.procs.values() if p.popen.poll() not in (None, 0) and not p.killed
            ]
            if failed:
                proc = failed[0]
                tail = proc.stderr.read_text(errors="replace").strip().splitlines()[-3:]
                raise LaunchError(
                    f"worker {proc.name} exited with code {proc.popen.returncode}: "
                    + (" | ".join(tail) or "no output"),
                    failed=proc.popen.returncode != 2,  # 2: its input (entry, config) is bad
                )
            running = [p for p in self.procs.values() if p.popen.poll() is None]
            if not running or self._stopping:
                return
            if self._joins_settled():
                return
            done = self.max_step >= self.opts.steps - 1 and not self._pending
            if done and all(self._idle(p) for p in running):
                return
            if done and self._done_at is None:
                self._done_at = time.monotonic()
            if self._done_at is not None and time.monotonic() - self._done_at > GRACE_S:
                return  # stragglers (a join still in flight, a paused side) are stopped
            if self._on_update:
                self._on_update(self)

    def _joins_settled(self) -> bool:
        """With `stop_after_join_steps`: every newcomer has contributed that many steps."""
        wanted = self.opts.stop_after_join_steps
        joiners = self.newcomers()
        if wanted is None or not joiners or self._pending:
            return False
        counts = {j: 0 for j in joiners}
        for record in self.timeline.of("progress"):
            if record["worker"] in counts:
                counts[record["worker"]] += 1
        return min(counts.values()) >= wanted

    def newcomers(self) -> set[str]:
        """The workers the churn makes join this run."""
        return {e.worker for e in self.opts.churn if e.kind == "join"}

    def _idle(self, proc: _Proc) -> bool:
        """A process that will never finish on its own: stopped, a spare (not a member,
        nothing to finish), or waiting to be admitted."""
        if self.pool is not None and proc.name in self.pool.waiting:
            return True
        return proc.stopped or self._waiting(proc.name)

    def _waiting(self, name: str) -> bool:
        """Whether `name` waits to be admitted (in standby, paused in a minority, removed)
        since the last view it trained in."""
        state = ""
        for record in self.timeline.records:
            if record.get("worker") != name:
                continue
            kind = record.get("kind")
            if kind in ("standby", "paused", "evicted"):
                state = "waiting"
            elif kind == "installed" and not record.get("paused"):
                state = "training"
        return state == "waiting"

    def _fire_due(self) -> None:
        while self._pending and self._pending[0].step <= self.max_step:
            if self._pending[0].kind == "join" and self._starting(self._pending[0].worker):
                return  # its spare is still starting up
            event = self._pending.pop(0)
            self._fire(event)

    def _starting(self, name: str) -> bool:
        """A spare is starting under `name` and not yet in standby."""
        if self.pool is None:  # a subclass' spares: every joiner of the schedule
            return name not in {r["worker"] for r in self.timeline.of("standby")}
        proc = self.procs.get(name)
        return name in self.pool.waiting and proc is not None and not proc.standby

    def _fire(self, event: ChurnEvent) -> None:
        self.note_fired(event)
        self._inject(event)

    def note_fired(self, event: ChurnEvent) -> None:
        """Record `event` as injected now (the report's events come from these)."""
        self.timeline.fired.append(Fired(event, time.monotonic(), self.max_step))
        self.last_event = f"{event.label} (step {self.max_step})"

    def _inject(self, event: ChurnEvent) -> None:
        proc = self.procs.get(event.worker)
        if event.kind == "leave":
            self.command(event.worker, {"cmd": "leave"})
        elif event.kind == "crash" and proc:
            proc.killed = True
            with contextlib.suppress(ProcessLookupError):
                proc.popen.send_signal(signal.SIGKILL)
        elif event.kind == "hang" and proc:
            proc.killed = proc.stopped = True
            with contextlib.suppress(ProcessLookupError):
                proc.popen.send_signal(signal.SIGSTOP)
        elif event.kind == "pause" and proc and proc.popen.poll() is None:
            proc.stopped = True
            with contextlib.suppress(ProcessLookupError):
                proc.popen.send_signal(signal.SIGSTOP)
            later = PAUSE_TIMEOUTS * self.opts.failure_timeout_s
            self._wakeups.append(asyncio.get_running_loop().call_later(later, self._wake, proc))
        elif event.kind in ("link-down", "link-up"):
            cmd = event.kind.replace("-", "_")
            for a, b in ((event.worker, event.peer), (event.peer, event.worker)):
                address = self.procs[b].address if b in self.procs else ""
                self.command(a, {"cmd": cmd, "peer": b, "address": address})
        elif event.kind == "join":
            seeds = self._live_members(newcomer=event.worker)
            if self.pool is not None and not self.pool.claim(event.worker):  # no spare: cold
                address = self._address_for(event.worker)
                self._spawn(event.worker, listen=address, join=seeds[0], start="cold")
                return
            self.command(event.worker, {"cmd": "join", "seed": seeds[0], "seeds": seeds[1:]})

    def _wake(self, proc: _Proc) -> None:
        """The end of a pause: the worker goes on from where it stopped."""
        proc.stopped = False
        if proc.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.popen.send_signal(signal.SIGCONT)

    def _live_members(self, newcomer: str = "") -> list[str]:
        """Addresses of the workers still in the job, in name order (the first is the
        seed `newcomer` asks through; the others are its fallbacks). Workers some event
        touched (a cut link, a pause: they may be outside the view now) come last."""
        fired = [f.event for f in self.timeline.fired if f.event.kind != "join"]
        gone = {e.worker for e in fired if e.kind in EXPLAINED}
        gone |= {newcomer} | {e.worker for e in self._pending if e.kind == "join"}
        gone |= set(self.pool.waiting if self.pool else ())
        touched = {w for e in fired for w in (e.worker, e.peer)}
        live = [
            (name in touched, name, proc.address)
            for name, proc in self.procs.items()
            if proc.address and proc.popen.poll() is None and name not in gone and not proc.stopped
        ]
        if not live:
            raise LaunchError("no live member left to join through")
        return [address for _, _, address in sorted(live)]

    @property
    def run_dir(self) -> Path:
        """This run's private directory (worker configs, stderr logs; removed at the end)."""
        return self._tmp

    def connected(self, worker: str) -> bool:
        """`worker` has reported on the control channel (it may have closed it since)."""
        return worker in self._writers

    def command(self, worker: str, command: dict) -> bool:
        """Send `command` to `worker` over the control channel; False if not connected."""
        writer = self._writers.get(worker)
        if writer is not None and not writer.is_closing():
            writer.write(json.dumps(command).encode() + b"\n")
            return True
        return False

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        worker = ""
        with contextlib.suppress(asyncio.CancelledError, ConnectionError):
            while line := await reader.readline():
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if not worker:  # its first record: it replaces a restarted spare's predecessor
                    worker = str(record.get("worker", ""))
                    self._writers[worker] = writer
                self._record(worker, record, current=self._writers.get(worker) is writer)
        self.disconnected.add(worker)  # every record it sent has been taken in

    def _record(self, worker: str, record: dict, *, current: bool = True) -> None:
        self.timeline.add(record)
        kind = record.get("kind")
        if kind == "standby" and current and worker in self.procs:
            self.procs[worker].standby = True
        elif kind == "joined" and self.pool is not None:
            self.pool.joined(worker)
        if kind == "ready" and worker in self.procs:
            self.procs[worker].address = record["address"]
            if record.get("metrics_port"):
                self.metrics_ports[worker] = int(record["metrics_port"])
        elif kind == "progress":
            self.max_step = max(self.max_step, int(record["step"]))
            self.members = int(record["members"])
            if record.get("samples_per_s"):
                self.samples_per_s = float(record["samples_per_s"])
        elif kind == "paused":
            self.last_event = f"{worker} paused: {record.get('reason', '')}"
        elif kind == "join_progress":
            pulled = ", ".join(f"{m} {n >> 10} KiB" for m, n in sorted(record["bytes"].items()))
            self.last_event = f"{worker} pulling {record['done']}/{record['shards']}: {pulled}"
        elif kind == "exit" and record.get("state_sha256"):
            self.digests[worker] = str(record["state_sha256"])

    def _reap(self) -> None:
        for proc in self.procs.values():
            if proc.popen.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.popen.send_signal(signal.SIGCONT)
                    proc.popen.terminate()
        deadline = time.monotonic() + 3
        for proc in self.procs.values():
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.popen.wait(max(0.0, deadline - time.monotonic()))
            if proc.popen.poll() is None:
                proc.popen.kill()
                proc.popen.wait()

    def initial_members(self) -> list[str]:
        """The members of the job's first view."""
        return self.opts.worker_names()[: self.opts.workers]

    def _problems(self, curve: list[tuple[int, float]], changes: list[dict]) -> list[str]:
        last = curve[-1][0] if curve else None
        progress = self.timeline.of("progress")
        return problems(
            steps=self.opts.steps - self.opts.start_step,
            completed=len(curve),
            digests=self.digests,
            finishers={r["worker"] for r in progress if r["step"] == last},
            members={m for r in self.timeline.of("agreed") for m in r.get("members", [])},
            started=self.procs,
            rejoining={n for n, p in self.procs.items() if not p.stopped and self._waiting(n)},
            fired=[f.event for f in self.timeline.fired],
            changes=changes,
        )

    def _report(self) -> Report:
        curve = self.timeline.loss_curve()
        elapsed = time.monotonic() - self._started
        gaps = self.timeline.step_gaps()
        changes = self.timeline.membership_changes(self.initial_members())
        return Report(
            membership=changes,
            problems=self._problems(curve, changes),
            steps=len(curve),
            global_batch=self.opts.global_batch,
            final_loss=curve[-1][1] if curve else float("nan"),
            loss_curve=curve,
            events=self.timeline.events(),
            members_curve=self.timeline.members_curve(),
            samples_per_s=len(curve) * self.opts.global_batch / elapsed if curve else None,
            example=self.opts.example or self.opts.entry,
            workers=self.opts.workers,
            dtype=self.opts.dtype,
            step_time_s=statistics.median(gaps) if gaps else None,
            joins=self.timeline.joins(),
            links=links_matrix(
                {r["worker"]: r.get("links") or {} for r in self.timeline.of("exit")},
                parse_links(self.opts.links),
                self.tc_sent if self.opts.netns else None,
            ),
            testbed="netns" if self.opts.netns else "in-process",
            checkpoints=durable.report_section(self.opts, self.timeline),
            spares=self.pool.report() if self.pool is not None and self.pool.size else None,
            processes=[
                {
                    "name": p.name,
                    "pid": p.popen.pid,
                    "exit_code": p.popen.returncode,
                    "state_sha256": self.digests.get(p.name) if p not in self.lost_spares else None,
                    "start": p.start,
                }
                | ({"metrics_port": self.metrics_ports.get(p.name)} if self.opts.metrics else {})
                for p in [*self.lost_spares, *self.procs.values()]
            ],
        )
