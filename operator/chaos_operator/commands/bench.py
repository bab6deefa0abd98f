"""`chaos bench <what>`: benchmarks that print JSON on stdout.

Each benchmark is a module `chaos_operator.benches.<what>` with `add_arguments(parser)` and
`run(args) -> dict`.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys

BENCHES = {
    "planner": "solve times of the greedy and MILP shard planners",
}


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("bench", help="run a benchmark and print JSON")
    inner = parser.add_subparsers(dest="bench", metavar="BENCH", required=True)
    for name, help_text in BENCHES.items():
        bench_parser = inner.add_parser(name, help=help_text)
        module = importlib.import_module(f"chaos_operator.benches.{name}")
        module.add_arguments(bench_parser)
        bench_parser.set_defaults(handler=_runner(module))


def _runner(module):
    def handler(args: argparse.Namespace) -> int:
        result = module.run(args)
        json.dump(result, sys.stdout, indent=2)
        sys.stdout.write("\n")
        return 0

    return handler
