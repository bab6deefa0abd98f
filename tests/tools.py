"""External tools the tests need (promtool, prometheus, helm): found, else skipped with the
reason, or a failure under CI (`CI` set and not false/0/no), like the control-plane tier."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def missing(reason: str) -> None:
    """Skip the test with `reason`, or fail it under CI."""
    if in_ci():
        pytest.fail(reason, pytrace=False)
    pytest.skip(reason)


def prometheus_binary(name: str) -> str:
    """Path of `prometheus` or `promtool` (Debian package 'prometheus')."""
    path = shutil.which(name)
    if path is None:
        missing(f"{name} not found (Debian package 'prometheus', see scripts/apt-packages.txt)")
    return str(path)


def helm_binary() -> str:
    """Path of `helm`: CHAOS_HELM, else what scripts/build-helm.sh built (it prints where)."""
    if os.environ.get("CHAOS_HELM"):
        path = Path(os.environ["CHAOS_HELM"])
    else:
        out = subprocess.run(
            ["bash", str(REPO / "scripts" / "build-helm.sh"), "--print-bin-dir"],
            check=True,
            capture_output=True,
            text=True,
        )
        path = Path(out.stdout.strip()) / "helm"
    if not os.access(path, os.X_OK):
        missing(f"helm not found at {path}; build it with `bash scripts/build-helm.sh`")
    return str(path)


def promtool(*args: str, input: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
    """Run `promtool ARGS...` (stdin `input`)."""
    return subprocess.run(
        [prometheus_binary("promtool"), *args], input=input, capture_output=True, timeout=60
    )


def assert_promtool_accepts(exposition: bytes) -> None:
    """`promtool check metrics` accepts the text exposition without a single lint warning."""
    result = promtool("check", "metrics", input=exposition)
    output = (result.stdout + result.stderr).decode()
    assert result.returncode == 0, output
    assert not output.strip(), f"promtool printed lint warnings:\n{output}"


def start_prometheus(config: Path, workdir: Path, port: int) -> subprocess.Popen[bytes]:
    """A real Prometheus with `config` on 127.0.0.1:`port`, data and log in `workdir`;
    the caller terminates it."""
    with (workdir / "prometheus.log").open("wb") as out:
        return subprocess.Popen(
            [
                prometheus_binary("prometheus"),
                f"--config.file={config}",
                f"--storage.tsdb.path={workdir / 'tsdb'}",
                f"--web.listen-address=127.0.0.1:{port}",
            ],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
        )


def prometheus_query(base: str, promql: str) -> list[dict]:
    """Instant query at Prometheus `base` URL; [] while it is not up yet."""
    url = f"{base}/api/v1/query?" + urllib.parse.urlencode({"query": promql})
    try:
        with urllib.request.urlopen(url, timeout=10) as reply:
            body = json.load(reply)
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return []
    assert body["status"] == "success", body
    return body["data"]["result"]
