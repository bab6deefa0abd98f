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
import os
import shutil
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
from chaos_worker.examples import EXAMPLES
from chaos_worker.launcher import JobOptions, LocalJob, free_ports

pytestmark = pytest.mark.cluster

DEADLINE_S = 300.0
WORKERS = ["w0", "w1", "w2"]
PAIRS = set(itertools.permutations(WORKERS, 2))


def binary(name: str) -> str:
    """Path of a Prometheus binary; under CI=true its absence fails, otherwise it skips."""
    path = shutil.which(name)
    if path is None:
        reason = f"{name} not found (Debian package 'prometheus', see scripts/apt-packages.txt)"
        if os.environ.get("CI") == "true":
            pytest.fail(reason)
        pytest.skip(reason)
    return path


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


def start_prometheus(
    binary: str, config: Path, tmp_path: Path, web_port: int, log: Path
) -> subprocess.Popen:
    """A Prometheus with `config`, its storage under `tmp_path`, its output in `log`."""
    with log.open("wb") as out:
        return subprocess.Popen(
            [
                binary,
                f"--config.file={config}",
                f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                f"--web.listen-address=127.0.0.1:{web_port}",
            ],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
        )


def query(base: str, promql: str) -> list[dict]:
    """Instant query; [] while Prometheus is not up yet."""
    url = f"{base}/api/v1/query?" + urllib.parse.urlencode({"query": promql})
    try:
        with urllib.request.urlopen(url, timeout=10) as reply:
            body = json.load(reply)
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return []
    assert body["status"] == "success", body
    return body["data"]["result"]


def links(result: list[dict]) -> set[tuple[str, str]]:
    return {(r["metric"]["src"], r["metric"]["dst"]) for r in result}


def test_prometheus_scrapes_link_matrix_and_training_counters(tmp_path):
    prometheus = binary("prometheus")
    promtool = binary("promtool")
    options = JobOptions(
        entry=EXAMPLES["digits"], workers=3, steps=10_000_000, churn=[], metrics=True
    )
    job = LocalJob(options)
    (web_port,) = free_ports(1, 0)
    base = f"http://127.0.0.1:{web_port}"
    config = tmp_path / "prometheus.yml"
    log = tmp_path / "prometheus.log"

    def wanted() -> dict[str, list[dict]]:
        return {
            "rtt": query(base, "chaos_link_rtt_seconds"),
            "bandwidth": query(base, "chaos_link_bandwidth_bytes_per_second"),
            "samples": query(base, "chaos_train_samples_total > 0"),
            "members": query(base, "chaos_members"),
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
            server = start_prometheus(prometheus, config, tmp_path, web_port, log)
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
