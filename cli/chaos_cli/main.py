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
from typing import NoReturn

from chaos_cli.errors import RunFailed, UserError


def _version() -> str:
    try:
        return version("chaos-train")
    except PackageNotFoundError:  # running from a source tree without installation
        return "0+unknown"


def command_names() -> list[str]:
    """Every module in `chaos_cli.commands` is one subcommand."""
    from chaos_cli import commands

    return sorted(m.name for m in pkgutil.iter_modules(commands.__path__))


class _Parser(argparse.ArgumentParser):
    """A usage error is one line and exit code 2, like any other bad input (the usage
    itself is one `--help` away); subcommands' parsers are of the same class."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {' '.join(message.split())} (see {self.prog} -h)\n")


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The argument parser with every subcommand registered (or only the command `only`:
    a worker process need not import every other command on its way up)."""
    parser = _Parser(
        prog="chaos",
        description="Elastic, self-healing PyTorch training across parties.",
    )
    parser.add_argument("--version", action="version", version=f"chaos {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in [only] if only else command_names():
        importlib.import_module(f"chaos_cli.commands.{name}").register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the process exit code."""
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser("worker" if argv[:1] == ["worker"] else None)
    args = parser.parse_args(argv)
    if not getattr(args, "handler", None):
        parser.print_help()
        return 2
    try:
        return int(args.handler(args) or 0)
    except UserError as exc:
        print(f"chaos {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except RunFailed as exc:
        print(f"chaos {args.command}: failed: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"chaos {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
