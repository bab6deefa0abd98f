"""goodput under churn: Chaos and torchrun-style restarts against churn-free torch DDP

One model (the `mlp` example of `--size` parameters, or a bundled `--example`), trained in
one run by both sides with `--workers` processes of one torch thread, global batch
`--global-batch`, `--steps` steps:

- **Chaos**: a local `chaos run` (mutual TLS unless `--insecure`) with an event every
  `--every` steps (`churn_schedule`): a departure and a join in turn (leave, join, crash,
  join, ...), so the membership stays between `--workers` - 1 and `--workers`; each
  departure takes the newest member, so w0 trains throughout and a departure never takes
  the last member holding the state, even when a join takes longer than N steps; joins
  start from warm spares, as `chaos run` does by default.
- **DDP**: torch DistributedDataParallel over gloo (`_ddp.py`), no churn.
- **torchrun-style**: the same events, each a full restart of the DDP job, composed of
  measured parts (`FORMULA`): a checkpoint's save and load (`torch.save` of the model and
  its optimizer's state after one step, fsynced, and `torch.load` of it), a bare process's
  start (the interpreter, torch and the factory: `_measure.bare_process`), the DDP ranks'
  rendezvous (last rank in to last rank out of `init_process_group` with the DDP model
  built), and the `--checkpoint-every`/2 steps lost on average since the last checkpoint;
  each checkpoint's save is paid every K steps. Failure detection, the agents' own restart
  and torchrun's `last_call_timeout` are left out, so it is a lower bound of torchrun's cost.

A side's samples/s is its completed steps times the global batch over the wall time from
its step `--warmup` to its last step (Chaos: the first report of each step; DDP: rank 0's
stamps). `chaos_over_ddp` is the goodput the target (0.95) is about; `step_s`, the median
gap between steps, tells the steady pace from what the events cost; `mean_members` and
`step_s_by_members` the capacity Chaos trained with and its pace with each member count
(the torchrun figure keeps DDP's full-membership pace).

A departure takes a worker's hardware away until the next join, which no system can make
up for: `matched` compares against DDP at the membership Chaos had. DDP also runs churn-free
with `--workers` - 1 ranks; `matched.ddp_samples_per_s` is the rate of DDP at each step's
member count (`matched_seconds`), `matched.capacity` that rate over full DDP's (the best
any system could reach on this schedule), `matched.chaos_over_ddp` Chaos's fraction of it,
and `matched.torchrun_over_ddp` the torchrun-style model restarting at each member count.
"""

from __future__ import annotations

import argparse
import bisect
import itertools
import statistics
import sys
from collections.abc import Iterable
from dataclasses import dataclass

from chaos_cli.argtypes import positive_int

TARGET = 0.95
FORMULA = (
    "torchrun_s = T*s + (T/K)*save_s + E*(load_s + start_s + rendezvous_s + (K/2)*s); "
    "torchrun_samples_per_s = T*G / torchrun_s; T: steps measured, s: DDP's churn-free "
    "seconds per step over them, G: global batch, K: checkpoint interval (steps), "
    "E: events (each a full restart from the last checkpoint)"
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--size", default="1M", help="parameter count of the mlp example (default 1M)"
    )
    parser.add_argument(
        "--example", default="", help="a bundled example to train instead of the mlp"
    )
    parser.add_argument("--workers", type=positive_int, default=2, help="processes (default 2)")
    parser.add_argument("--steps", type=positive_int, default=500, help="steps (default 500)")
    parser.add_argument(
        "--every", type=positive_int, default=100, help="steps between events (default 100)"
    )
    parser.add_argument(
        "--checkpoint-every",
        type=positive_int,
        default=50,
        help="torchrun-style: steps between checkpoints (default 50)",
    )
    parser.add_argument(
        "--warmup", type=int, default=10, help="first steps left out of the rates (default 10)"
    )
    parser.add_argument(
        "--global-batch", type=positive_int, default=64, help="samples per step (default 64)"
    )
    parser.add_argument("--dtype", default="float32", choices=("float32", "float64"))
    parser.add_argument("--insecure", action="store_true", help="Chaos links in plain TCP")


def churn_schedule(workers: int, steps: int, every: int) -> str:
    """An event every `every` steps, each followed by a full interval before `steps`: a
    departure and a join in turn, departures alternating leave and crash. A departure
    takes the newest member (the last joiner, or the last initial worker), so w0 stays;
    joiners are named w<workers>, w<workers+1>, ... as `chaos run` names them."""
    if workers < 2:
        raise ValueError("a departure needs a member left behind: at least 2 workers")
    items: list[str] = []
    departures = itertools.cycle(("leave", "crash"))
    newest, joined = f"w{workers - 1}", workers
    for index, step in enumerate(range(every, steps - every + 1, every)):
        if index % 2 == 0:
            items.append(f"{next(departures)}:{newest}@{step}")
        else:
            items.append(f"join@{step}")
            newest, joined = f"w{joined}", joined + 1
    return ",".join(items)


@dataclass(frozen=True)
class RestartParts:
    """The measured parts of one torchrun-style restart, and a checkpoint's save."""

    start_s: float
    rendezvous_s: float
    save_s: float
    load_s: float

    @property
    def restart_s(self) -> float:
        """What one event stops the job for, the lost steps apart."""
        return self.load_s + self.start_s + self.rendezvous_s


def torchrun_seconds(
    *, steps: int, step_s: float, events: int, checkpoint_every: int, parts: RestartParts
) -> float:
    """`FORMULA`'s torchrun_s: `steps` steps of `step_s`, a checkpoint saved every
    `checkpoint_every` steps, and per event a restart plus half an interval redone."""
    k = checkpoint_every
    return steps * step_s + steps / k * parts.save_s + events * (parts.restart_s + k / 2 * step_s)


def samples_per_s(
    times: dict[int, float], warmup: int, global_batch: int
) -> tuple[float, int, float]:
    """`(samples/s, steps, seconds)` from step `warmup`'s completion (in step order) to the
    last step's: the steps between them times the global batch over the time between."""
    steps = sorted(times)
    if len(steps) < warmup + 2:
        raise ValueError(f"{len(steps)} steps: too few after a warm-up of {warmup}")
    first, last = steps[warmup], steps[-1]
    seconds = times[last] - times[first]
    return (last - first) * global_batch / seconds, last - first, seconds


def members_at(curve: list[tuple[int, int]], steps: Iterable[int]) -> list[int]:
    """Each step's member count in a members curve of (step, members) points: a count
    holds until the next point (before the first point: the first count)."""
    if not curve:
        raise ValueError("an empty members curve")
    points = sorted(curve)
    at = [step for step, _ in points]
    return [points[max(0, bisect.bisect_right(at, step) - 1)][1] for step in steps]


def mean_members(curve: list[tuple[int, int]], first: int, last: int) -> float:
    """Mean member count over steps `first`..`last`-1."""
    if last <= first:
        raise ValueError("no steps to average the members over")
    return statistics.mean(members_at(curve, range(first, last)))


def matched_seconds(
    curve: list[tuple[int, int]], first: int, last: int, step_s: dict[int, float]
) -> float:
    """Seconds DDP takes for steps `first`+1..`last` at the member count of each (a
    members curve of (step, members) points), from its seconds per step by rank count."""
    counts = members_at(curve, range(first + 1, last + 1))
    missing = sorted(set(counts) - set(step_s))
    if missing:
        raise ValueError(f"no DDP pace for {missing} ranks")
    return sum(step_s[count] for count in counts)


def step_s_by_members(
    times: dict[int, float], curve: list[tuple[int, int]], warmup: int
) -> dict[int, float]:
    """Median seconds per step by the member count that trained it, over the gaps between
    consecutive reported steps from step `warmup` on (a gap over unreported steps is
    shared out among them)."""
    steps = sorted(times)[warmup:]
    gaps: dict[int, list[float]] = {}
    for (a, b), members in zip(
        itertools.pairwise(steps), members_at(curve, steps[1:]), strict=True
    ):
        gaps.setdefault(members, []).append((times[b] - times[a]) / (b - a))
    return {members: statistics.median(g) for members, g in sorted(gaps.items())}


def run(args: argparse.Namespace) -> dict:
    from chaos_cli.benches._measure import (
        bare_start_s,
        checkpoint_round_trip,
        example_model,
        mlp_model,
        mlp_params,
        param_count,
    )
    from chaos_cli.errors import UserError

    if args.workers < 2:
        raise UserError("--workers: at least 2 (a departure leaves a member behind)")
    if 2 * args.every > args.steps:
        raise UserError("--every: at most half of --steps (an event and a full interval after)")
    if not 0 <= args.warmup < args.every:
        raise UserError("--warmup: must be >= 0 and end before the first event (--every)")
    if args.example:
        label, entry, size = example_model(args.example, "--example")
    else:
        label, entry, size = mlp_model(args.size, "--size")
    schedule = churn_schedule(args.workers, args.steps, args.every)
    events = len(schedule.split(","))
    with mlp_params(size):
        params = param_count(entry)
        _say(f"{label}: checkpoint save and load, a bare process's start")
        saved = checkpoint_round_trip(_trained_state(entry, args.dtype))
        start_s = bare_start_s(entry, dtype=args.dtype)
        _say(f"{label}: DDP, no churn")
        ddp, rendezvous_s = _ddp(entry, args, args.workers)
        _say(f"{label}: DDP, no churn, one rank fewer ({args.workers - 1})")
        short, _ = _ddp(entry, args, args.workers - 1)
        _say(f"{label}: Chaos, {schedule}")
        chaos, span = _chaos(entry, schedule, args)
    parts = RestartParts(start_s, rendezvous_s, saved.save_s, saved.load_s)
    ddp_rate, chaos_rate = ddp.pop("samples_per_s"), chaos.pop("samples_per_s")
    short_rate = short.pop("samples_per_s")
    steps = ddp["measured_steps"]

    def torchrun_rate(step_s: float) -> float:
        seconds = torchrun_seconds(
            steps=steps,
            step_s=step_s,
            events=events,
            checkpoint_every=args.checkpoint_every,
            parts=parts,
        )
        return steps * args.global_batch / seconds

    full_step_s = args.global_batch / ddp_rate
    pace = {args.workers: full_step_s, args.workers - 1: args.global_batch / short_rate}
    curve, first, last = span
    matched_rate = (last - first) * args.global_batch / matched_seconds(curve, first, last, pace)
    torchrun_full = torchrun_rate(full_step_s)
    torchrun_matched = torchrun_rate(args.global_batch / matched_rate)
    return {
        "model": FORMULA,
        "job": {
            "example": label,
            "params": params,
            "workers": args.workers,
            "global_batch": args.global_batch,
            "dtype": args.dtype,
            "torch_threads": 1,
            "tls": not args.insecure,
            "warmup": args.warmup,
        },
        "steps": args.steps,
        "every": args.every,
        "checkpoint_every": args.checkpoint_every,
        "schedule": schedule,
        "events": events,
        "chaos_samples_per_s": round(chaos_rate, 2),
        "ddp_samples_per_s": round(ddp_rate, 2),
        "torchrun_samples_per_s": round(torchrun_full, 2),
        "chaos_over_ddp": round(chaos_rate / ddp_rate, 4),
        "torchrun_over_ddp": round(torchrun_full / ddp_rate, 4),
        "target": TARGET,
        "met": chaos_rate / ddp_rate >= TARGET,
        "matched": {
            "ddp_samples_per_s": round(matched_rate, 2),
            "capacity": round(matched_rate / ddp_rate, 4),
            "chaos_over_ddp": round(chaos_rate / matched_rate, 4),
            "torchrun_over_ddp": round(torchrun_matched / matched_rate, 4),
            "met": chaos_rate / matched_rate >= TARGET,
            "ddp_short": short | {"ranks": args.workers - 1, "samples_per_s": round(short_rate, 2)},
        },
        "chaos": chaos,
        "ddp": ddp,
        "torchrun": {
            "seconds": round(steps * args.global_batch / torchrun_full, 3),
            "restart_s": round(parts.restart_s, 4),
            "lost_steps_per_event": args.checkpoint_every / 2,
            "checkpoint_s_per_step": round(parts.save_s / args.checkpoint_every, 6),
        },
        "parts": {
            "start_s": round(parts.start_s, 4),
            "rendezvous_s": round(parts.rendezvous_s, 4),
            "checkpoint_save_s": round(parts.save_s, 4),
            "checkpoint_load_s": round(parts.load_s, 4),
            "checkpoint_bytes": saved.bytes,
        },
    }


def _say(what: str) -> None:
    print(f"goodput: {what}", file=sys.stderr, flush=True)


def _trained_state(entry: str, dtype: str) -> dict:
    """The model's and optimizer's state dicts after one optimizer step (with zero
    gradients): the optimizer's per-parameter state (Adam's moments) exists, as in a
    checkpoint taken during training."""
    import torch
    from chaos_worker.training.trainspec import load_trainspec

    spec = load_trainspec(entry, seed=0, dtype=getattr(torch, dtype), device=torch.device("cpu"))
    for param in spec.model.parameters():
        if param.requires_grad:
            param.grad = torch.zeros_like(param)
    spec.optimizer.step()
    return {"model": spec.model.state_dict(), "optimizer": spec.optimizer.state_dict()}


def _ddp(entry: str, args: argparse.Namespace, workers: int) -> tuple[dict, float]:
    """DDP's side with `workers` ranks, and its measured rendezvous."""
    from chaos_cli.benches import _ddp

    result = _ddp.train(
        entry,
        workers=workers,
        steps=args.steps,
        global_batch=args.global_batch,
        dtype=args.dtype,
    )
    return _side(dict(enumerate(result.step_stamps)), args), result.rendezvous_s


def _chaos(
    entry: str, schedule: str, args: argparse.Namespace
) -> tuple[dict, tuple[list[tuple[int, int]], int, int]]:
    """Chaos's side, and its members curve with the first and last step measured."""
    import asyncio

    from chaos_cli.benches._measure import BUSY_FAILURE_TIMEOUT_S
    from chaos_cli.local.churn import parse_churn
    from chaos_cli.local.launcher import JobOptions, LocalRun

    options = JobOptions(
        entry=entry,
        workers=args.workers,
        steps=args.steps,
        global_batch=args.global_batch,
        dtype=args.dtype,
        tls=not args.insecure,
        churn=parse_churn(schedule, args.workers),
        failure_timeout_s=BUSY_FAILURE_TIMEOUT_S,
    )
    job = LocalRun(options)
    report = asyncio.run(job.run())
    times = job.timeline.step_times()
    side = _side(times, args)
    first, curve = sorted(times)[args.warmup], report.members_curve
    return side | {
        "mean_members": round(mean_members(curve, first, max(times)), 3),
        "step_s_by_members": {
            str(members): round(step_s, 5)
            for members, step_s in step_s_by_members(times, curve, args.warmup).items()
        },
        "events": [
            e.model_dump(
                include={"type", "worker", "step", "incumbent_stall_s", "steps_lost"}
                | ({"scale_out_delay_s"} if e.type == "join" else set())
            )
            for e in report.events
        ],
        "problems": report.problems,
    }, (curve, first, max(times))


def _side(times: dict[int, float], args: argparse.Namespace) -> dict:
    """A side's rate over its measured steps, and its median step (`step_s`)."""
    from chaos_cli.benches._measure import steady_step_s

    rate, steps, seconds = samples_per_s(times, args.warmup, args.global_batch)
    return {
        "samples_per_s": rate,
        "step_s": round(steady_step_s([times[s] for s in sorted(times)], args.warmup), 5),
        "measured_steps": steps,
        "seconds": round(seconds, 3),
    }
