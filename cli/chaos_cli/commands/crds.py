"""`chaos crds`: print, write or check the generated ChaosJob and ChaosPeer CRDs."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from chaos_cli.errors import UserError


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "crds",
        help="print, write or check the CRDs generated from the API models",
        description=(
            "Generate the CustomResourceDefinitions of chaos.training.dev (ChaosJob, ChaosPeer) "
            "from the pydantic models. Without options, print them as one YAML stream "
            "(e.g. `chaos crds | kubectl apply -f -`). Exit code 1 when --check finds a "
            "difference, 2 on bad input."
        ),
    )
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--out", metavar="DIR", help="write one YAML file per CRD into DIR")
    where.add_argument(
        "--check",
        metavar="DIR",
        help="compare DIR with the generator's output; exit 1 and list the files that differ",
    )
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from chaos_operator.api.crdgen import generate

    files = generate()
    if args.check:
        return _check(Path(args.check), files)
    if args.out:
        out = Path(args.out)
        if out.exists() and not out.is_dir():
            raise UserError(f"--out: {out} is not a directory")
        try:
            out.mkdir(parents=True, exist_ok=True)
            for name, text in files.items():
                (out / name).write_text(text, encoding="utf-8")
        except OSError as exc:
            raise UserError(f"--out: cannot write {out}: {exc.strerror or exc}") from None
        for name in files:
            print(out / name)
        return 0
    sys.stdout.write("---\n".join(files.values()))
    return 0


def _check(directory: Path, files: dict[str, str]) -> int:
    if not directory.is_dir():
        raise UserError(f"--check: {directory} is not a directory")
    problems = []
    for name, text in files.items():
        path = directory / name
        if not path.is_file():
            problems.append(f"{path}: missing")
        elif path.read_text(encoding="utf-8") != text:
            problems.append(f"{path}: differs from the generator")
    for path in sorted(directory.glob("*.yaml")):
        if path.name not in files:
            problems.append(f"{path}: not produced by the generator (stale?)")
    for problem in problems:
        print(f"chaos crds: {problem}", file=sys.stderr)
    if problems:
        print(f"chaos crds: run `chaos crds --out {directory}` and commit", file=sys.stderr)
        return 1
    print(f"{directory}: {len(files)} CRDs up to date")
    return 0
