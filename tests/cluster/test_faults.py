"""Faults `chaos run` does not announce, caused for real from outside the run: a worker
paused with SIGSTOP for longer than the failure timeout, TCP connections reset by the
kernel (`ss -K`), a worker's network cut in its namespace. The job must go on with no step
lost, the losses of the churn-free run, equal final states, and every member back.
"""

from __future__ import annotations

import ast
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.cluster.test_netns import netns  # noqa: F401 (a fixture)
from tests.cluster.test_run import assert_same_losses, chaos, run_job

pytestmark = pytest.mark.cluster

STEPS = "600"
LIKE = ("--workers", "3", "--steps", STEPS, "--dtype", "float64", "--churn", "none")


class Watched:
    """A `chaos run` in the background whose workers log their progress (INFO) into a
    run directory kept under `tmp_path`, so that a test can act at a given step."""

    def __init__(self, tmp_path: Path, *args: str, env: dict[str, str] | None = None) -> None:
        self.report = tmp_path / "faulted.json"
        self._tmp = tmp_path / "runs"
        self._tmp.mkdir()
        env = {
            **os.environ,
            **(env or {}),
            "TMPDIR": str(self._tmp),
            "CHAOS_KEEP_RUN_DIR": "1",
            "CHAOS_LOG_LEVEL": "INFO",
        }
        command = [sys.executable, "-m", "chaos_cli.main", "run", "--quiet"]
        self.proc = subprocess.Popen(
            [*command, "--report", str(self.report), *args],
            cwd=tmp_path,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )

    def run_dir(self) -> Path:
        return self._wait(lambda: next(self._tmp.glob("chaos-run-*"), None), "the run directory")

    def at_step(self, worker: str, step: int) -> None:
        """Wait until `worker` has logged completing `step`."""
        log = self.run_dir() / f"{worker}.stderr"
        needle = f"progress {{'step': {step},"
        self._wait(lambda: log.exists() and needle in log.read_text(errors="replace"), needle)

    def pid(self, worker: str) -> int:
        config = str(self.run_dir() / f"{worker}.json")
        found = subprocess.run(["pgrep", "-f", config], capture_output=True, text=True)
        return int(found.stdout.split()[0])

    def address(self, worker: str) -> str:
        log = self.run_dir() / f"{worker}.stderr"
        for line in log.read_text().splitlines():
            if " ready {" in line:
                return line.split("'address': '")[1].split("'")[0]
        raise AssertionError(f"{worker} never said where it listens")

    def finish(self) -> tuple[dict, str]:
        _, stderr = self.proc.communicate(timeout=600)
        assert self.proc.returncode == 0, stderr
        return json.loads(self.report.read_text()), stderr

    def _wait(self, found, what: str):
        deadline = time.monotonic() + 300  # only turns a hang into a failure
        while not (value := found()):
            assert self.proc.poll() is None, f"the run ended before {what}"
            assert time.monotonic() < deadline, f"gave up waiting for {what}"
            time.sleep(0.02)
        return value


@pytest.fixture(scope="module")
def baseline(tmp_path_factory) -> dict:
    return run_job(tmp_path_factory.mktemp("baseline"), "baseline", *LIKE)


def assert_whole(report: dict, baseline: dict, workers: int = 3) -> None:
    """Every step, the churn-free losses, one final state, every worker to the end."""
    assert [s for s, _ in report["loss_curve"]] == list(range(int(STEPS)))
    assert_same_losses(report["loss_curve"], baseline["loss_curve"])
    assert report["problems"] == []
    digests = {p["name"]: p["state_sha256"] for p in report["processes"]}
    assert sorted(digests) == [f"w{i}" for i in range(workers)]
    assert len(set(digests.values())) == 1
    assert {p["exit_code"] for p in report["processes"]} == {0}


@pytest.mark.parametrize("worker", ["w1", "w0"])  # a member, and the root
def test_a_worker_paused_past_the_timeout_is_removed_and_rejoins_by_itself(
    worker: str, baseline: dict, tmp_path: Path
) -> None:
    run = Watched(tmp_path, *LIKE, "--failure-timeout", "1")
    run.at_step(worker, 100)
    pid = run.pid(worker)
    os.kill(pid, signal.SIGSTOP)  # a GC pause, VM steal: past the failure timeout
    # woken once the others removed it, not after a fixed time: the job must still have
    # steps left for the rejoin (two members of this job can train the remaining 500 steps
    # in under 2 s, and a sleep of 2.5 s once let the job end before the rejoin's step)
    survivor = run.run_dir() / ("w2.stderr" if worker == "w0" else "w0.stderr")
    # the decision that removes it: both survivors may have suspected it (two causes)
    removed = f"'causes': ['crash:{worker}'"
    run._wait(lambda: removed in survivor.read_text(errors="replace"), f"{worker} removed")
    os.kill(pid, signal.SIGCONT)
    report, _ = run.finish()
    assert_whole(report, baseline)
    changes = [(c["removed"], c["added"]) for c in report["membership"]]
    assert changes == [([worker], []), ([], [worker])]  # out, then back by itself
    assert report["events"] == []  # nothing was injected


def _held_at_step_100(tmp_path: Path, *extra: str) -> tuple[Watched, Path]:
    """A run of `stuckfactory` (with `extra` options) whose w1 has its compute held in the
    step after step 100; the directory whose `stuck-w1` holds it."""
    held = tmp_path / "held"
    held.mkdir()
    env = {
        "CHAOS_STUCK_DIR": str(held),
        "PYTHONPATH": os.pathsep.join([str(Path.cwd()), os.environ.get("PYTHONPATH", "")]),
    }
    entry = ("--entry", "tests.cluster.stuckfactory:factory")
    run = Watched(tmp_path, *LIKE, *entry, *extra, "--failure-timeout", "1", env=env)
    run.at_step("w1", 100)
    (held / "stuck-w1").touch()
    run._wait(lambda: (held / "held-w1").exists(), "w1's compute to be held")
    return run, held


@pytest.mark.skipif(shutil.which("ss") is None, reason="needs ss (iproute2) to reset sockets")
def test_a_member_stuck_in_its_compute_still_reports_to_a_recovery(
    baseline: dict, tmp_path: Path
) -> None:
    """w1's compute thread is held in the middle of a step (its event loop runs on) when
    the kernel resets every connection into w2. The abort cancels w1's all-reduce, so w1
    can no longer complete that step and tells the coordinator how far it got at once,
    not once its compute returns: the recovery keeps everyone and is agreed while w1 is
    still held. (Before, w1 spoke only once its compute returned: nobody decided, since
    the coordinator does not suspect a member it still hears from, and after twice the
    failure timeout every member took itself for the one cut off and paused.) Buckets of
    4 KiB keep the compute on its thread (backward's hooks release the digits' 38 kB): a
    short one-bucket compute runs on the event loop (`INLINE_COMPUTE_S`; see the test
    after this one)."""
    if os.geteuid() != 0:
        pytest.skip("ss -K needs root")
    run, held = _held_at_step_100(tmp_path, "--bucket-mb", "0.00390625")
    port = run.address("w2").rpartition(":")[2]
    subprocess.run(["ss", "-K", "dst", "127.0.0.1", "dport", "=", f":{port}"], check=True)
    w0 = run.run_dir() / "w0.stderr"
    members = run._wait(lambda: _recovery_members(w0.read_text(errors="replace")), "a recovery")
    still_held = (held / "stuck-w1").exists()
    (held / "stuck-w1").unlink()
    report, _ = run.finish()
    assert members == ["w0", "w1", "w2"]
    assert still_held
    assert_whole(report, baseline)
    assert report["membership"] == []  # nobody was removed


def test_a_member_whose_short_compute_stalls_on_its_event_loop_is_taken_for_hung(
    baseline: dict, tmp_path: Path
) -> None:
    """The digits' one-bucket compute takes milliseconds, so after the first step it runs
    on the event loop (`INLINE_COMPUTE_S`). Held there past the failure timeout, it leaves
    w1 silent: the others remove it as they would a paused process, and it comes back as
    a newcomer by itself once its compute returns."""
    run, held = _held_at_step_100(tmp_path)
    survivor = run.run_dir() / "w0.stderr"
    removed = "'causes': ['crash:w1'"
    run._wait(lambda: removed in survivor.read_text(errors="replace"), "w1 removed")
    (held / "stuck-w1").unlink()
    report, _ = run.finish()
    assert_whole(report, baseline)
    changes = [(c["removed"], c["added"]) for c in report["membership"]]
    assert changes == [(["w1"], []), ([], ["w1"])]  # out, then back by itself


def _recovery_members(log: str) -> list[str] | None:
    """The members of the first decision a worker's log says it agreed on after a reset."""
    for line in log.splitlines():
        if " agreed {" in line and "'causes': ['reset:" in line:
            return ast.literal_eval(line.split(" agreed ", 1)[1])["members"]
    return None


@pytest.mark.skipif(shutil.which("ss") is None, reason="needs ss (iproute2) to reset sockets")
def test_reset_connections_are_not_crashes(baseline: dict, tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("ss -K needs root")
    run = Watched(tmp_path, *LIKE)
    run.at_step("w0", 100)
    port = run.address("w2").rpartition(":")[2]
    # every member's link into w2 gets a RST, as a middlebox or a NAT timeout would cause
    subprocess.run(["ss", "-K", "dst", "127.0.0.1", "dport", "=", f":{port}"], check=True)
    report, _ = run.finish()
    assert_whole(report, baseline)
    assert report["membership"] == []  # nobody was removed


def test_scaling_to_zero_ends_the_run_cleanly(tmp_path: Path) -> None:
    churn = "leave:w0@10,leave:w1@10,leave:w2@10"
    result = chaos(
        "run", "--quiet", "--workers", "3", "--steps", "50", "--churn", churn, cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr
    assert "scaled to zero" in result.stdout and "Traceback" not in result.stderr
    report = json.loads((tmp_path / "chaos-report.json").read_text())
    assert report["membership"][-1]["members"] == []
    assert {p["exit_code"] for p in report["processes"]} == {0}


@pytest.mark.usefixtures("netns")
def test_a_worker_cut_off_pauses_and_rejoins_when_its_network_is_back(
    baseline: dict, tmp_path: Path
) -> None:
    """A real partition: w3's interface goes down in its namespace (packets vanish, no
    reset, no goodbye). The three others hold the majority and train on; w3, alone, pauses
    (it must not train a second copy of the job) and, once the link is back, asks to be
    admitted again and comes back with the state it missed."""
    run = Watched(tmp_path, *LIKE[:1], "4", *LIKE[2:], "--netns")
    run.at_step("w0", 100)
    namespace = subprocess.run(
        ["ip", "netns", "identify", str(run.pid("w3"))], capture_output=True, text=True
    ).stdout.strip()
    subprocess.run(["ip", "-n", namespace, "link", "set", "eth0", "down"], check=True)
    w3 = run.run_dir() / "w3.stderr"
    run._wait(lambda: " paused {" in w3.read_text(), "w3 to pause")
    run.at_step("w0", 300)  # the majority trains on meanwhile
    subprocess.run(["ip", "-n", namespace, "link", "set", "eth0", "up"], check=True)
    report, _ = run.finish()
    assert_whole(report, baseline, workers=4)
    changes = [(c["removed"], c["added"]) for c in report["membership"]]
    assert changes == [(["w3"], []), ([], ["w3"])]


@pytest.mark.usefixtures("netns")
def test_a_silent_link_is_routed_around_and_nobody_is_removed(
    baseline: dict, tmp_path: Path
) -> None:
    """w0 and w1 cannot reach each other any more (a blackhole route in each namespace),
    while both still reach w2: each hears the other through w2's flooded heartbeats but
    nothing over their own link, so that link is reported down and the tree goes around
    it. Nobody is suspected."""
    run = Watched(tmp_path, *LIKE, "--netns")
    run.at_step("w0", 100)
    spaces = {}
    for worker in ("w0", "w1"):
        found = subprocess.run(
            ["ip", "netns", "identify", str(run.pid(worker))], capture_output=True, text=True
        )
        spaces[worker] = found.stdout.strip()
    ips = {w: run.address(w).rpartition(":")[0] for w in ("w0", "w1")}
    for here, there in (("w0", "w1"), ("w1", "w0")):
        route = ["ip", "-n", spaces[here], "route", "add", "blackhole", f"{ips[there]}/32"]
        subprocess.run(route, check=True)
    report, _ = run.finish()
    assert_whole(report, baseline)
    assert report["membership"] == []
    logs = "".join((run.run_dir() / f"{w}.stderr").read_text() for w in ("w0", "w1", "w2"))
    assert "'event': 'link_down'" in logs
