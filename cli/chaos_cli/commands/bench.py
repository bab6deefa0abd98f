"""`chaos bench <what>`: benchmarks that print JSON on stdout.

Each benchmark is a module `chaos_cli.benches.<what>` whose docstring's first line is its
help, with `add_arguments(parser)` and `run(args) -> dict`. Modules whose name starts with
an underscore are helpers of the benches, not benches.
"""

from __future__ import annotations

import argparse
import importlib
import json
import pkgutil
import sys


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("bench", help="run a benchmark and print JSON")
    inner = parser.add_subparsers(dest="bench", metavar="BENCH", required=True)
    from chaos_cli import benches

    for info in sorted(pkgutil.iter_modules(benches.__path__), key=lambda m: m.name):
        if info.name.startswith("_"):
            continue
        module = importlib.import_module(f"chaos_cli.benches.{info.name}")
        help_text = (module.__doc__ or "").strip().splitlines()[0] if module.__doc__ else None
        bench_parser = inner.add_parser(info.name, help=help_text)
        module.add_arguments(bench_parser)
        bench_parser.set_defaults(handler=_runner(module))


def _runner(module):
    def handler(args: argparse.Namespace) -> int:
        result = module.run(args)
        json.dump(result, sys.stdout, indent=2)
        sys.stdout.write("\n")
        return 0

    return handler
