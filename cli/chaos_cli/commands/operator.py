"""`chaos operator`: run the Kubernetes operator (kopf, standalone) for ChaosJobs."""

from __future__ import annotations

import argparse
import re
from pathlib import Path
from typing import Any

from chaos_cli.errors import UserError


def positive_float(text: str) -> float:
    """An argparse type: a number > 0."""
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "operator",
        help="run the operator that turns ChaosJobs into worker pods",
        description="Reconcile ChaosJobs into worker pods and a headless Service, keep their "
        "status, post Events. Runs standalone (no kopf peering): run one per party and "
        "namespace set. Uses the in-cluster service account, else KUBECONFIG / ~/.kube/config.",
    )
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument(
        "--namespace",
        "-n",
        action="append",
        metavar="NS",
        help="watch this namespace (repeatable)",
    )
    where.add_argument("--all-namespaces", "-A", action="store_true", help="watch every namespace")
    parser.add_argument(
        "--liveness",
        default="http://0.0.0.0:8080/healthz",
        metavar="URL",
        help="liveness endpoint (default http://0.0.0.0:8080/healthz; 'off' for none)",
    )
    parser.add_argument(
        "--resync",
        type=positive_float,
        default=10.0,
        metavar="S",
        help="seconds between full resyncs, which also read the step from the members (default 10)",
    )
    parser.add_argument(
        "--pod-host",
        metavar="HOST",
        help="address every member on this host (a test pod runner on one machine); "
        "default: each pod's DNS name under the job's headless Service",
    )
    parser.add_argument(
        "--base-port",
        type=int,
        default=7070,
        metavar="PORT",
        help="first member port; member n uses PORT+3n .. PORT+3n+2 (default 7070)",
    )
    parser.add_argument(
        "--steps",
        type=int,
        default=1_000_000_000,
        metavar="N",
        help="training steps of every worker (default: train until the job is deleted)",
    )
    parser.add_argument(
        "--insecure-workers",
        action="store_true",
        help="run worker links plaintext: issue no certificates (default: mutual TLS, each pod "
        "a certificate in the Secret <pod>-tls from the namespace's chaos-worker-ca; with "
        "--identity, trusting the other parties' worker CAs the federation brings)",
    )
    parser.add_argument(
        "--metrics-port",
        type=int,
        default=8081,
        metavar="PORT",
        help="serve the operator's Prometheus metrics on PORT at /metrics (default 8081; 0: off)",
    )
    parser.add_argument(
        "--metrics-host",
        default="0.0.0.0",
        metavar="HOST",
        help="address the metrics server binds (default 0.0.0.0)",
    )
    parser.add_argument(
        "--prometheus-url",
        metavar="URL",
        help="measure the goodput of autoscaled jobs with instant queries to this Prometheus "
        "(http[s]://host:port); default: from two scrapes of the members' /metrics",
    )
    parser.add_argument(
        "--prometheus-query",
        metavar="PROMQL",
        help="the goodput query, $namespace and $job substituted (default: the sum of "
        'rate(chaos_train_samples_total[1m]) of series labelled namespace="$namespace" and '
        'pod=~"$job-w[0-9]+")',
    )
    fed = parser.add_argument_group(
        "federation", "talk to the operators named in ChaosPeer objects (docs/operator.md)"
    )
    fed.add_argument(
        "--federation-listen",
        metavar="HOST:PORT",
        help="serve the federation API (mutual TLS) here; needs --identity",
    )
    fed.add_argument(
        "--identity",
        metavar="DIR",
        help="this party's identity: ca.crt, tls.crt, tls.key (`chaos identity init`)",
    )
    fed.add_argument(
        "--federation-interval",
        type=positive_float,
        default=3.0,
        metavar="S",
        help="seconds between exchanges with each peer (default 3)",
    )
    parser.add_argument("--verbose", "-v", action="store_true", help="log kopf's details")
    parser.set_defaults(handler=handle)


def handle(args: argparse.Namespace) -> int:
    from chaos_operator.autoscaler import PROMETHEUS_QUERY
    from chaos_operator.main import Settings, StartupError, run_operator
    from chaos_operator.pods import Options

    if not 1 <= args.base_port <= 65535 - 3000:
        raise UserError("--base-port must lie in 1..62535")
    if args.steps < 1:
        raise UserError("--steps must be at least 1")
    if not 0 <= args.metrics_port <= 65535:
        raise UserError("--metrics-port must lie in 0..65535 (0: off)")
    url = args.prometheus_url
    if url is not None and not re.fullmatch(r"https?://[^\s/]+(/\S*)?", url):
        raise UserError(f"--prometheus-url must be http[s]://host[:port][/path], not {url!r}")
    identity, listen = _federation_args(args)
    settings = Settings(
        namespaces=tuple(args.namespace or ()),
        options=Options(
            pod_host=args.pod_host,
            base_port=args.base_port,
            steps=args.steps,
            worker_tls=not args.insecure_workers,
        ),
        resync_s=args.resync,
        liveness=None if args.liveness == "off" else args.liveness,
        metrics_host=args.metrics_host,
        metrics_port=args.metrics_port,
        prometheus_url=url,
        prometheus_query=args.prometheus_query or PROMETHEUS_QUERY,
        identity=identity,
        federation_listen=listen,
        federation_interval_s=args.federation_interval,
        verbose=args.verbose,
    )
    try:
        run_operator(settings)
    except StartupError as exc:
        flag = f"--{exc.setting.replace('_', '-')}: " if exc.setting else ""
        raise UserError(f"{flag}{exc}") from None
    return 0


def _federation_args(args: argparse.Namespace) -> tuple[Any, tuple[str, int] | None]:
    """(identity, (host, port)) from --identity and --federation-listen; both or neither."""
    if bool(args.identity) != bool(args.federation_listen):
        raise UserError("--federation-listen and --identity go together")
    if not args.identity:
        return None, None
    from chaos_operator.federation.identity import IdentityError, load

    host, _, port = args.federation_listen.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise UserError(f"--federation-listen: expected HOST:PORT, got {args.federation_listen!r}")
    try:
        identity = load(Path(args.identity))
    except IdentityError as exc:
        raise UserError(f"--identity: {exc}") from None
    return identity, (host.strip("[]"), int(port))
