"""The root plans a join from measured link figures, not from the configured shapes.

A real 4-worker local job (`LocalJob`, real processes, shaped loopback links) where the
link from w1 to the newcomer w4 is eight times slower than the others. The newcomer times
its downlink from every member before it asks to join; the plan must then give w1 far
fewer shard bytes than the others. The tolerance absorbs measurement noise on a loaded
machine (the fast links can measure anywhere from half to well above their rate) but an
equal split, which is what a plan that ignored the measurement would give with a greedy
over equal figures, fails. While the job runs, the workers' /metrics show the newcomer's
scale-out and the replicated bytes on both ends. Nothing asserts on speed.
"""

from __future__ import annotations

import asyncio
import statistics
import urllib.request

import pytest
from chaos_worker.churn import parse_churn
from chaos_worker.examples import EXAMPLES
from chaos_worker.examples.bigstate import COMPUTE_ENV, ENV
from chaos_worker.launcher import JobOptions, LocalJob

pytestmark = pytest.mark.cluster

LINKS = "w1-w4=4MB/s,*=32MB/s"


def _scrape(port: int) -> dict[str, float]:
    """`{series: value}` of one worker's exposition (no HELP/TYPE lines)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    series = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            series[name] = float(value)
    return series


async def _run(job: LocalJob) -> tuple[object, dict[str, dict[str, float]]]:
    """Run the job; once the newcomer has completed a few steps, scrape w4 and w2."""
    task = asyncio.get_running_loop().create_task(job.run())
    scraped: dict[str, dict[str, float]] = {}
    while not task.done():
        await asyncio.sleep(0.5)
        steps = [r for r in job.timeline.of("progress") if r["worker"] == "w4"]
        if len(steps) >= 3 and not scraped:
            for worker in ("w4", "w2"):
                scraped[worker] = await asyncio.to_thread(_scrape, job.metrics_ports[worker])
    return await task, scraped


def test_a_slow_measured_link_gets_proportionally_fewer_shard_bytes(monkeypatch) -> None:
    monkeypatch.setenv(ENV, "8")
    monkeypatch.setenv(COMPUTE_ENV, "200")
    options = JobOptions(
        entry=EXAMPLES["bigstate"],
        example="bigstate",
        workers=4,
        steps=60,
        churn=parse_churn("join@15", 4),
        links=LINKS,
        metrics=True,
    )
    report, scraped = asyncio.run(_run(LocalJob(options)))

    (join,) = report.joins
    assert join["path"] == "observer"
    assert join["figures"] == {m: "measured" for m in ("w0", "w1", "w2", "w3")}
    bandwidths = join["bandwidths"]
    others = ("w0", "w2", "w3")
    # the plan used the measurement: w1's figure is the slowest, and not the configured 4 MB/s
    assert bandwidths["w1"] < min(bandwidths[m] for m in others)
    assert bandwidths["w1"] != 4e6
    shard_bytes = join["bytes_per_source"]
    assert shard_bytes["w1"] < 0.5 * statistics.median(shard_bytes[m] for m in others)
    assert sum(shard_bytes.values()) > 8e6

    newcomer, source = scraped["w4"], scraped["w2"]
    assert newcomer["chaos_scale_out_duration_seconds_count"] == 1
    received = {
        m: newcomer.get(f'chaos_replication_bytes_total{{direction="received",peer="{m}"}}', 0)
        for m in shard_bytes
    }
    assert received == {m: float(n) for m, n in shard_bytes.items() if n} | {
        m: 0 for m, n in shard_bytes.items() if not n
    }
    sent = source['chaos_replication_bytes_total{direction="sent",peer="w4"}']
    assert sent == shard_bytes["w2"]
