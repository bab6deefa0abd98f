"""Entry point of one worker process: load the job, bind, and run the member."""

from __future__ import annotations

import asyncio
import errno
import json
import logging
import os
import sys
import time
from typing import TYPE_CHECKING

from chaos_worker.config import WorkerConfig

if TYPE_CHECKING:
    from chaos_worker.replication.sidecar import EarlyReplicator

log = logging.getLogger("chaos_worker")

GIL_SWITCH_S = 0.0005
"""How long a thread waiting for the GIL lets its holder run before asking for it (Python's
default: 5 ms). The compute thread holds the GIL through much of a small model's step, so
each time the event loop let go of it (any socket call) a control message could wait up to
5 ms, and a membership change takes several such hops. `chaos bench events --repeats 5`,
two runs each: link down 17.6 and 18.7 ms at 5 ms, 14.6 and 15.1 ms at 0.5 ms; leave 7.6
and 9.5 against 6.3 and 6.5 ms. `chaos bench throughput` did not move beyond its noise."""


def pick_device(name: str):
    """`auto` means CUDA when present, else CPU."""
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def run_worker(config: WorkerConfig, phases: dict[str, float] | None = None) -> int:
    """Run one member until the job's last step; returns the exit code. `phases`: when
    each phase of the start-up ended (`time.monotonic()`), reported with `ready`."""
    phases = {} if phases is None else phases
    from chaos_worker.replication.sidecar import early_replicator

    early = early_replicator(config)  # its interpreter starts while this one imports torch
    try:
        code = _run(config, phases, early)
    finally:
        if early is not None and early.child.address == "":  # the member never ran
            early.abandon()
    return code


def _run(config: WorkerConfig, phases: dict[str, float], early: EarlyReplicator | None) -> int:
    import torch

    from chaos_worker.collective import NonFiniteGradient
    from chaos_worker.heap import keep_freed_memory
    from chaos_worker.member import Member
    from chaos_worker.net.tls import TlsError
    from chaos_worker.replication.checkpoint import CheckpointError
    from chaos_worker.replication.private import NoRoom
    from chaos_worker.training.trainspec import FactoryError, load_trainspec

    logging.basicConfig(
        level=os.environ.get("CHAOS_LOG_LEVEL", "WARNING").upper(),
        format=f"%(asctime)s {config.id} %(levelname)s %(message)s",
    )
    phases["imported"] = time.monotonic()
    keep_freed_memory()
    torch.set_num_threads(1)
    sys.setswitchinterval(GIL_SWITCH_S)
    device = pick_device(config.device)
    dtype = getattr(torch, config.dtype)
    try:
        spec = load_trainspec(config.entry, seed=config.seed, dtype=dtype, device=device)
    except FactoryError as exc:
        print(f"chaos worker {config.id}: error: {exc}", file=sys.stderr)
        return 2
    phases["built"] = time.monotonic()
    try:
        member = Member(config, spec, device, phases=phases, early=early)
    except (TlsError, CheckpointError) as exc:
        print(f"chaos worker {config.id}: error: {exc}", file=sys.stderr)
        return 2
    except NoRoom as exc:  # the machine's, not the job's fault: exit 1
        print(f"chaos worker {config.id}: error: {exc}", file=sys.stderr)
        return 1
    phases["member"] = time.monotonic()
    try:
        asyncio.run(member.run())
        write_termination_log(
            config.termination_log, member.progress.completed, member.checkpoint_step
        )
    except (NonFiniteGradient, NoRoom) as exc:
        print(f"chaos worker {config.id}: error: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            print(f"chaos worker {config.id}: error: {config.listen} is taken", file=sys.stderr)
            return 2
        raise
    return 0


def write_termination_log(path: str | None, step: int, checkpoint: int | None = None) -> None:
    """Say the last step completed (`{"step": N}`) and the newest checkpoint this member
    wrote or resumed from (`"checkpoint": S`, when there is one) where the kubelet copies it
    into the container's status (`terminated.message`), so the operator learns a finished
    job's last step and final checkpoint even when no scrape saw them; a failure to write
    is logged, not raised."""
    if not path or step < 0:  # nowhere to say it, or no step completed
        return
    message: dict[str, int] = {"step": step}
    if checkpoint is not None:
        message["checkpoint"] = checkpoint
    try:
        with open(path, "w", encoding="utf-8") as out:
            json.dump(message, out)
    except OSError as exc:
        log.warning("cannot write the termination message to %s: %s", path, exc)
