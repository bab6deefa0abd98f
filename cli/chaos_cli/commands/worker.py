"""`chaos worker --config FILE`: one member of an elastic job (what a pod runs)."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from pydantic import ValidationError

from chaos_cli.errors import UserError
from chaos_cli.validation import describe_validation_error


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("worker", help="run one worker process of a job")
    parser.add_argument("--config", required=True, help="worker configuration (JSON file)")
    parser.set_defaults(handler=handle)


def handle(args: argparse.Namespace) -> int:
    phases = {"main": time.monotonic()}  # the interpreter is up, the CLI parsed
    from chaos_worker.config import WorkerConfig
    from chaos_worker.priority import exit_at_once
    from chaos_worker.process import run_worker

    try:
        raw = json.loads(Path(args.config).read_text())
        config = WorkerConfig.model_validate(raw)
    except (OSError, json.JSONDecodeError) as exc:
        raise UserError(f"--config {args.config}: {exc}") from None
    except ValidationError as exc:
        raise UserError(f"--config {args.config}: {describe_validation_error(exc)}") from None
    exit_at_once(run_worker(config, phases))
