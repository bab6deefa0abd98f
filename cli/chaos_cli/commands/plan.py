"""`chaos plan`: the shard plan for a newcomer, from a JSON request, printed as JSON."""

from __future__ import annotations

import argparse
import json
import sys
from importlib import resources

from chaos_cli.errors import UserError

EXAMPLE = "data/plan-example.json"


def register(sub: argparse._SubParsersAction) -> None:
    from chaos_planner import SOLVERS

    parser = sub.add_parser(
        "plan",
        help="plan which source sends how many state shards to a newcomer",
        description=(
            "Read a plan request (JSON: state_bytes, optional shard_counts, sources with id, "
            "bandwidth_bytes_per_s and optional latency_s, ready_s, max_shards) and print "
            "the plan as JSON. Exit code 2 on bad input."
        ),
    )
    parser.add_argument(
        "--solver",
        choices=sorted(SOLVERS),
        default="greedy",
        help="greedy (exact, fast; default), milp (exact, slow) or a baseline",
    )
    parser.add_argument(
        "request",
        nargs="?",
        metavar="FILE",
        help="request file, '-' for stdin; without it, a built-in example",
    )
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from chaos_planner import PlanningError, PlanRequest, solve
    from pydantic import ValidationError

    from chaos_cli.validation import describe_validation_error

    text = _read(args.request)
    try:
        document = json.loads(text)
    except json.JSONDecodeError as exc:
        raise UserError(
            f"invalid JSON: {exc.msg} (line {exc.lineno}, column {exc.colno})"
        ) from None
    except (ValueError, RecursionError) as exc:  # a huge integer, a very deep nesting
        reason = "nested too deeply" if isinstance(exc, RecursionError) else "a number too long"
        raise UserError(f"invalid JSON: {reason}") from None
    try:
        request = PlanRequest.model_validate(document)
        plan = solve(request, args.solver)
    except ValidationError as exc:
        raise UserError(describe_validation_error(exc)) from None
    except PlanningError as exc:
        raise UserError(str(exc)) from None
    json.dump(plan.model_dump(), sys.stdout, indent=2)
    sys.stdout.write("\n")
    return 0


def _read(name: str | None) -> str:
    if name is None:
        return resources.files("chaos_cli").joinpath(EXAMPLE).read_text(encoding="utf-8")
    if name == "-":
        return sys.stdin.read()
    try:
        with open(name, encoding="utf-8") as handle:
            return handle.read()
    except FileNotFoundError:
        raise UserError(f"FILE: {name}: no such file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(
            f"FILE: {name}: cannot read: {getattr(exc, 'strerror', None) or exc}"
        ) from None
