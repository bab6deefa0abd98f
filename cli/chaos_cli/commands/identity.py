"""`chaos identity`: create or show a party's identity for federation (CA + operator cert)."""

from __future__ import annotations

import argparse
from pathlib import Path

from chaos_cli.errors import UserError


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "identity",
        help="create or show this party's federation identity (CA and operator certificate)",
        description="A party's identity for federation: its own CA and an operator certificate "
        "signed by it, used both as TLS server and client certificate. Other parties pin it in "
        "a ChaosPeer by caBundle (ca.crt) or keyFingerprint (printed here). Keys are never "
        "printed.",
    )
    actions = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    init = actions.add_parser(
        "init",
        help="create a party CA and an operator certificate",
        description="Write ca.crt, ca.key, tls.crt and tls.key (keys mode 0600) into DIR — the "
        "layout of a Kubernetes TLS Secret plus ca.crt (keep ca.key out of the cluster) — and "
        "print the keyFingerprint that other parties' ChaosPeers pin.",
    )
    init.add_argument(
        "--party", required=True, metavar="NAME", help="this party's name (a DNS label)"
    )
    init.add_argument("--out", required=True, metavar="DIR", help="directory to write into")
    init.add_argument(
        "--san",
        action="append",
        metavar="NAME",
        help="DNS name or IP address of the operator (repeatable; default localhost, 127.0.0.1)",
    )
    init.add_argument(
        "--days", type=int, default=365, metavar="N", help="validity of the operator certificate"
    )
    init.add_argument("--force", action="store_true", help="replace existing files")
    init.set_defaults(handler=run_init)
    show = actions.add_parser(
        "show",
        help="print the party and keyFingerprint of an identity",
        description="Check an identity directory and print its party and keyFingerprint.",
    )
    show.add_argument("dir", metavar="DIR")
    show.set_defaults(handler=run_show)


def run_init(args: argparse.Namespace) -> int:
    from chaos_operator.federation.identity import DEFAULT_SANS, IdentityError, create, write

    try:
        identity = create(args.party, tuple(args.san or DEFAULT_SANS), args.days)
        paths = write(identity, Path(args.out), force=args.force)
    except IdentityError as exc:
        raise UserError(str(exc)) from None
    except OSError as exc:
        raise UserError(f"--out: cannot write {args.out}: {exc.strerror or exc}") from None
    print(f"party: {identity.party}")
    print(f"keyFingerprint: {identity.fingerprint}")
    for path in paths:
        print(f"wrote {path}")
    return 0


def run_show(args: argparse.Namespace) -> int:
    from chaos_operator.federation.identity import IdentityError, load

    try:
        identity = load(Path(args.dir))
    except IdentityError as exc:
        raise UserError(str(exc)) from None
    print(f"party: {identity.party}")
    print(f"keyFingerprint: {identity.fingerprint}")
    return 0
