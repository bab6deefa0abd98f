"""per directed link, the rate a bulk TCP transfer gets through the netns testbed vs the shaped rate

Builds the `chaos run --netns` testbed (needs root) for `--workers` workers with `--links`
(default: the bundled `@three-party` profile), then, one link at a time, sends
`--seconds` worth of the shaped rate from the src namespace to a sink in the dst namespace
and divides the bytes received by the time from their first to their last byte. This is
what tc gives TCP payload; the transport's added delay is not in this path (measure it with
`chaos run --netns` and the report's `links`). The testbed is removed at the end.
"""

from __future__ import annotations

import argparse

from chaos_cli.argtypes import positive_int
from chaos_cli.errors import UserError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--workers", type=positive_int, default=3, help="workers (default 3)")
    parser.add_argument(
        "--links", default="@three-party", help="link spec or @profile (default @three-party)"
    )
    parser.add_argument(
        "--seconds", type=float, default=2.0, help="transfer length per link (default 2 s)"
    )


def run(args: argparse.Namespace) -> dict:
    from chaos_worker.net.shaping import ShapeError, parse_links

    from chaos_cli.local.netns import NetnsError, NetnsTestbed, unavailable_reason
    from chaos_cli.local.profiles import resolve_links

    if not 0 < args.seconds <= 60:
        raise UserError("--seconds must be in (0, 60]")
    if why := unavailable_reason():
        raise UserError(f"bench testbed needs network namespaces: {why}")
    workers = [f"w{i}" for i in range(args.workers)]
    try:
        spec = resolve_links(args.links, workers)
        shapes = parse_links(spec)
    except ShapeError as exc:
        raise UserError(str(exc)) from None
    try:
        bed = NetnsTestbed.create(workers, shapes)
    except NetnsError as exc:
        raise UserError(str(exc)) from None
    rows = []
    try:
        for (src, dst), rate in sorted(bed.plan.rates.items()):
            nbytes = int(rate * args.seconds)
            measured = bed.measure_rate(src, dst, nbytes, timeout_s=20 + 3 * args.seconds)
            rows.append(
                {
                    "src": src,
                    "dst": dst,
                    "shaped_bytes_per_s": rate,
                    "measured_bytes_per_s": round(measured),
                    "ratio": round(measured / rate, 3),
                }
            )
    finally:
        bed.close()
    worst = max((abs(r["ratio"] - 1) for r in rows), default=0.0)
    return {"links": spec, "seconds": args.seconds, "worst_error": round(worst, 3), "rows": rows}
