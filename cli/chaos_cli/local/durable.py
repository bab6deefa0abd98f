"""Checkpoints in `chaos run`: the options, which checkpoint a resumed run starts from, and
what the report says of them (`docs/checkpoints.md`).

`--checkpoint-dir DIR` makes the root of the view write a checkpoint every
`--checkpoint-every` steps (default 100) and/or `--checkpoint-every-s` seconds, keeping the
newest `--checkpoint-keep` (default 3), and the final state when the run ends. Resuming is
explicit: `--resume DIR` (a checkpoint, or a directory of them) starts the initial members
from the newest checkpoint that verifies; newer ones that do not are skipped with one line
each on stderr. A resumed run writes its checkpoints to the same directory unless
`--checkpoint-dir` says otherwise. A directory that already holds checkpoints is never
resumed from silently: a run without `--resume` starts at step 0.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path

from chaos_cli.errors import UserError

DEFAULT_EVERY_STEPS = 100
DEFAULT_KEEP = 3


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """`chaos run`'s checkpoint options."""
    parser.add_argument(
        "--checkpoint-dir",
        metavar="DIR",
        help="write checkpoints of the training state here (the view's root writes them, "
        "off the step loop), and the final state when the run ends",
    )
    parser.add_argument(
        "--checkpoint-every",
        type=int,
        default=DEFAULT_EVERY_STEPS,
        metavar="STEPS",
        help=f"a checkpoint every STEPS steps (default {DEFAULT_EVERY_STEPS}; 0: not by steps)",
    )
    parser.add_argument(
        "--checkpoint-every-s",
        type=float,
        metavar="SECONDS",
        help="also a checkpoint when SECONDS have passed since the last one (default: off)",
    )
    parser.add_argument(
        "--checkpoint-keep",
        type=int,
        default=DEFAULT_KEEP,
        metavar="K",
        help=f"keep the newest K checkpoints (default {DEFAULT_KEEP})",
    )
    parser.add_argument(
        "--resume",
        metavar="DIR",
        help="start from the newest checkpoint in DIR that verifies (or from the checkpoint "
        "DIR itself) instead of step 0; checkpoints then go on into DIR",
    )


def checkpoint_options(args: argparse.Namespace, *, entry: str, seed: int, batch: int) -> dict:
    """The `JobOptions` fields of the checkpoint options; UserError on bad input."""
    from chaos_worker.config import MAX_STATE_BYTES
    from chaos_worker.replication.checkpoint import NAME, CheckpointError, mismatch, resolve

    if args.checkpoint_every < 0:
        raise UserError("--checkpoint-every must be 0 (off) or a number of steps")
    every_s = args.checkpoint_every_s
    if every_s is not None and not 0 < every_s < math.inf:
        raise UserError("--checkpoint-every-s must be a positive, finite number of seconds")
    if args.checkpoint_keep < 1:
        raise UserError("--checkpoint-keep must be at least 1")
    fields: dict = {
        "checkpoint_every_steps": args.checkpoint_every or None,
        "checkpoint_every_s": every_s,
        "checkpoint_keep": args.checkpoint_keep,
    }
    folder = args.checkpoint_dir
    if args.resume:
        source = Path(args.resume)

        def skip(path: Path, why: str) -> None:
            print(f"chaos run: skipping checkpoint {path}: {why}", file=sys.stderr)

        try:
            path, manifest = resolve(source, MAX_STATE_BYTES, skip)
        except CheckpointError as exc:
            raise UserError(f"--resume: {exc}") from None
        why = mismatch(manifest, {"entry": entry, "seed": seed, "global_batch": batch})
        if why:
            raise UserError(f"--resume {path}: {why}")
        if manifest.dtype != args.dtype:
            raise UserError(f"--resume {path}: it holds {manifest.dtype} state; give --dtype")
        if manifest.step >= args.steps:
            raise UserError(
                f"--resume {path}: it is the state after step {manifest.step - 1}; "
                f"--steps {args.steps} leaves nothing to train"
            )
        fields |= {"resume_from": str(path.resolve()), "start_step": manifest.step}
        if folder is None:
            folder = str(path.parent if NAME.match(path.name) else source)
    if folder is not None:
        where = Path(folder)
        try:
            where.mkdir(0o700, parents=True, exist_ok=True)
        except OSError as exc:
            raise UserError(f"--checkpoint-dir {where}: {exc.strerror}") from None
        if not where.is_dir() or not os.access(where, os.W_OK | os.X_OK):
            raise UserError(f"--checkpoint-dir {where}: cannot write there")
        fields["checkpoint_dir"] = str(where.resolve())
    return fields


def worker_fields(opts) -> dict:
    """The `WorkerConfig` fields of a run's checkpoint options (`JobOptions`)."""
    return {
        "checkpoint_dir": opts.checkpoint_dir,
        "checkpoint_every_steps": opts.checkpoint_every_steps,
        "checkpoint_every_s": opts.checkpoint_every_s,
        "checkpoint_keep": opts.checkpoint_keep,
        "resume_from": opts.resume_from,
    }


def report_section(opts, timeline) -> dict | None:
    """The report's `checkpoints`: where from a resumed run started, and every checkpoint
    written (by whom, how big, how long the copy and the write took); None without any."""
    if opts.checkpoint_dir is None and opts.resume_from is None:
        return None
    written = [
        {k: r.get(k) for k in ("worker", "step", "path", "final", "bytes", "copy_s", "write_s")}
        for r in timeline.of("checkpoint")
    ]
    finals = [w["path"] for w in written if w["final"]]
    return {
        "dir": opts.checkpoint_dir,
        "every_steps": opts.checkpoint_every_steps,
        "every_s": opts.checkpoint_every_s,
        "keep": opts.checkpoint_keep,
        "resumed_from": opts.resume_from,
        "resumed_step": opts.start_step if opts.resume_from else None,
        "written": written,
        "final": finals[-1] if finals else None,
    }
