"""A real Prometheus scrapes a 3-worker local job: the link matrix and training counters.

The job is started with far more steps than it will run and is cancelled (its workers are
reaped) as soon as Prometheus holds the series under test. Waits poll with a generous
deadline that only turns a hang into a failure; nothing asserts on speed.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import subprocess
import time
from pathlib import Path

import pytest
from chaos_cli.local.launcher import JobOptions, LocalRun, free_ports
from chaos_worker.examples import EXAMPLES

from tests.tools import prometheus_binary, prometheus_query, start_prometheus

pytestmark = pytest.mark.cluster

DEADLINE_S = 300.0
WORKERS = ["w0", "w1", "w2"]
PAIRS = set(itertools.permutations(WORKERS, 2))


def write_config(path: Path, ports: dict[str, int]) -> None:
    """Scrape every worker each second; the member id becomes a target label."""
    targets = [
        {"targets": [f"127.0.0.1:{port}"], "labels": {"member": name}}
        for name, port in sorted(ports.items())
    ]
    config = {
        "global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
        "scrape_configs": [{"job_name": "chaos-workers", "static_configs": targets}],
    }
    path.write_text(json.dumps(config, indent=2))  # JSON is YAML


def links(result: list[dict]) -> set[tuple[str, str]]:
    return {(r["metric"]["src"], r["metric"]["dst"]) for r in result}


def test_prometheus_scrapes_link_matrix_and_training_counters(tmp_path):
    promtool = prometheus_binary("promtool")
    options = JobOptions(
        entry=EXAMPLES["digits"], workers=3, steps=10_000_000, churn=[], metrics=True
    )
    job = LocalRun(options)
    (web_port,) = free_ports(1, 0)
    base = f"http://127.0.0.1:{web_port}"
    config = tmp_path / "prometheus.yml"
    log = tmp_path / "prometheus.log"

    def wanted() -> dict[str, list[dict]]:
        return {
            "rtt": prometheus_query(base, "chaos_link_rtt_seconds"),
            "bandwidth": prometheus_query(base, "chaos_link_bandwidth_bytes_per_second"),
            "samples": prometheus_query(base, "chaos_train_samples_total > 0"),
            "members": prometheus_query(base, "chaos_members"),
        }

    def complete(got: dict[str, list[dict]]) -> bool:
        return (
            links(got["rtt"]) == PAIRS
            and links(got["bandwidth"]) == PAIRS
            and {r["metric"]["member"] for r in got["samples"]} == set(WORKERS)
        )

    async def scenario() -> dict[str, list[dict]]:
        task = asyncio.ensure_future(job.run())
        server = None
        try:
            while len(job.metrics_ports) < len(WORKERS):
                assert not task.done(), "the job ended before its workers were started"
                await asyncio.sleep(0.05)
            write_config(config, job.metrics_ports)
            check = subprocess.run(
                [promtool, "check", "config", str(config)], capture_output=True, timeout=60
            )
            assert check.returncode == 0, check.stdout + check.stderr
            server = start_prometheus(config, tmp_path, web_port)
            deadline = time.monotonic() + DEADLINE_S
            got: dict[str, list[dict]] = {}
            while time.monotonic() < deadline:
                assert server.poll() is None, log.read_text()[-2000:]
                if task.done():
                    task.result()  # raises the launcher's error, if any
                    pytest.fail(f"the job finished before Prometheus had the series: {got}")
                got = await asyncio.to_thread(wanted)
                if complete(got):
                    return got
                await asyncio.sleep(0.5)
            pytest.fail(f"Prometheus did not get every series within {DEADLINE_S} s: {got}")
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            if server is not None:
                server.terminate()
                server.wait(30)

    got = asyncio.run(scenario())
    # the link matrix: one series per ordered pair, labelled with both ends
    for result in (got["rtt"], got["bandwidth"]):
        for series in result:
            assert series["metric"]["src"] == series["metric"]["member"]
            assert float(series["value"][1]) > 0
    assert all(float(s["value"][1]) > 0 for s in got["samples"])
    assert {int(float(s["value"][1])) for s in got["members"]} == {3}
    # every worker process is gone once the job is cancelled
    assert all(p.popen.poll() is not None for p in job.procs.values())
