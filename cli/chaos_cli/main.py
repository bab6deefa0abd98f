"""The `chaos` command: one entry point for every role (plan, run, worker, bench, ...).

Each subcommand lives in `chaos_cli.commands.<name>` and exposes
`register(subparsers)`; heavy imports (torch, kopf) happen inside the command's handler so
that `chaos --help` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys
from importlib.metadata import PackageNotFoundError, version

from chaos_cli.errors import UserError


def _version() -> str:
    try:
        return version("chaos-train")
    except PackageNotFoundError:  # running from a source tree without installation
        return "0+unknown"


def command_names() -> list[str]:
    """Every module in `chaos_cli.commands` is one subcommand."""
    from chaos_cli import commands

    return sorted(m.name for m in pkgutil.iter_modules(commands.__path__))


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every subcommand registered."""
    parser = argparse.ArgumentParser(
        prog="chaos",
        description="Elastic, self-healing PyTorch training across parties.",
    )
    parser.add_argument("--version", action="version", version=f"chaos {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in command_names():
        importlib.import_module(f"chaos_cli.commands.{name}").register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the process exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "handler", None):
        parser.print_help()
        return 2
    try:
        return int(args.handler(args) or 0)
    except UserError as exc:
        print(f"chaos {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"chaos {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
