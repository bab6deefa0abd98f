"""`chaos run` end to end: real worker processes on loopback, real torch training, churn."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import tempfile
from dataclasses import replace
from pathlib import Path
from unittest import mock

import pytest
from chaos_cli.commands.run import options_from
from chaos_cli.local.churn import parse_churn
from chaos_cli.local.launcher import KEEP_RUN_DIR, JobOptions, LocalRun
from chaos_cli.main import build_parser
from chaos_worker.config import BUCKET_BYTES, WorkerConfig
from chaos_worker.examples import EXAMPLES

pytestmark = pytest.mark.cluster

BAD = "tests.unit.badfactories"
CHURN = "leave:w4@8,crash:w1@16,link-down:w0-w2@24,link-up:w0-w2@30"


def chaos(*args: str, cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "chaos_cli.main", *args],
        cwd=cwd,
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=300,
    )


LIKE_BASELINE = ("--workers", "5", "--steps", "80", "--dtype", "float64")


def run_job(tmp_path: Path, name: str, *extra: str, env: dict[str, str] | None = None) -> dict:
    report = tmp_path / f"{name}.json"
    result = chaos("run", "--quiet", "--report", str(report), *extra, cwd=tmp_path, env=env)
    assert result.returncode == 0, result.stderr
    return json.loads(report.read_text())


def leftover_workers(under: Path | None = None) -> list[str]:
    """Command lines of worker processes started by a `chaos run` that are still alive
    (only those whose run directory is under `under`, if given: see `in_tmp`)."""
    found = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if "chaos-run-" in cmdline and " worker " in cmdline and str(under or "") in cmdline:
            found.append(cmdline)
    return found


def in_tmp(path: Path) -> dict[str, str]:
    """Environment that puts a run's directory under `path`, so that `leftover_workers(path)`
    sees only that run's workers, not those of other runs on the machine."""
    return {"TMPDIR": str(path)}


def assert_same_losses(a: list, b: list, rel: float = 1e-9) -> None:
    assert [s for s, _ in a] == [s for s, _ in b]
    for (step, x), (_, y) in zip(a, b, strict=True):
        assert abs(x - y) <= rel * max(abs(x), abs(y)), f"step {step}: {x!r} != {y!r}"


def assert_trained_through_churn_and_a_join(report: dict, baseline: dict) -> None:
    """`report`, of a run with `CHURN` and a join at step 40, lost no step, met no problem
    and trained `baseline`'s float64 losses."""
    assert report["problems"] == []
    assert [s for s, _ in report["loss_curve"]] == list(range(80)), "a step was lost"
    assert_same_losses(report["loss_curve"], baseline["loss_curve"])
    assert [e["type"] for e in report["events"]] == [
        "leave", "crash", "link_down", "link_up", "join"
    ]  # fmt: skip


@pytest.fixture(scope="module")
def baseline(tmp_path_factory) -> dict:
    tmp = tmp_path_factory.mktemp("baseline")
    return run_job(tmp, "none", *LIKE_BASELINE, "--churn", "none")


def test_churn_gives_the_same_losses_without_lost_steps_or_restarts(baseline, tmp_path):
    churned = run_job(
        tmp_path,
        "churn",
        *LIKE_BASELINE,
        "--churn",
        CHURN,
    )
    assert churned["steps"] == baseline["steps"] == 80
    assert [s for s, _ in churned["loss_curve"]] == list(range(80)), "a step was lost"
    assert_same_losses(churned["loss_curve"], baseline["loss_curve"])
    assert [e["type"] for e in churned["events"]] == ["leave", "crash", "link_down", "link_up"]
    assert all(e["steps_lost"] == 0 for e in churned["events"])
    # No survivor was restarted: exactly the five initial processes ever ran, and every
    # one of them but the crashed one exited cleanly after the last step.
    names = [p["name"] for p in churned["processes"]]
    assert sorted(names) == ["w0", "w1", "w2", "w3", "w4"]
    codes = {p["name"]: p["exit_code"] for p in churned["processes"]}
    assert codes.pop("w1") != 0
    assert set(codes.values()) == {0}
    assert churned["members_curve"][-1][1] == 3
    assert (tmp_path / "churn.png").stat().st_size > 10_000
    assert not [p for p in churned["processes"] if Path(f"/proc/{p['pid']}").exists()]


def test_members_that_start_as_on_a_gpu_train_through_churn_and_a_join(baseline, tmp_path):
    """Every process takes 2 s more to load and its first step 1.5 s more, longer than the
    failure timeout (the GIL free, as while CUDA loads kernels: `slowstartfactory.py`),
    the newcomer's first step included: the issue's GPU run with churn did not finish.
    Here the losses are the churn-free run's and nobody is taken for crashed."""
    churned = run_job(
        tmp_path,
        "slowstart",
        *LIKE_BASELINE,
        "--entry",
        "tests.cluster.slowstartfactory:factory",
        "--churn",
        f"{CHURN},join@40",
        env={
            "CHAOS_SLOW_LOAD_S": "2",
            "CHAOS_SLOW_FIRST_STEP_S": "1.5",
            "PYTHONPATH": os.pathsep.join([str(Path.cwd()), os.environ.get("PYTHONPATH", "")]),
        },
    )
    assert_trained_through_churn_and_a_join(churned, baseline)
    assert [c["removed"] for c in churned["membership"] if "w5" in c["removed"]] == []
    assert "w5" in churned["membership"][-1]["members"]


class _Settings(LocalRun):
    """A run whose workers get `settings`: real fields of the worker config that `chaos
    run` does not expose (a test's seam, not a mock)."""

    def __init__(self, options: JobOptions, **settings) -> None:
        super().__init__(options)
        self.settings = settings

    def worker_config(self, name: str, *, listen: str, **fields):
        return super().worker_config(name, listen=listen, **self.settings, **fields)


def test_buckets_released_during_backward_keep_the_losses_through_churn(baseline):
    """Buckets of 4 KiB and micro-batches of 5 samples: the bundled examples fit one 4 MiB
    bucket, which the trainer releases whole after the compute; the digits in float64
    (38 kB) make 10 here, released by the last micro-batch's backward while it runs
    (`training/overlap.py`)."""
    options = JobOptions(
        entry=EXAMPLES["digits"],
        example="digits",
        workers=5,
        steps=80,
        dtype="float64",
        churn=parse_churn(f"{CHURN},join@40", 5),
        bucket_bytes=4096,  # what `chaos run --bucket-mb 0.00390625` sets
        micro_batch=5,  # `--micro-batch 5`
    )
    churned = asyncio.run(LocalRun(options).run()).model_dump()
    assert_trained_through_churn_and_a_join(churned, baseline)


def test_the_bucket_and_micro_batch_options_reach_every_worker_config() -> None:
    def config(**options) -> WorkerConfig:
        run = LocalRun(JobOptions(entry=EXAMPLES["digits"], tls=False, **options))
        return run.worker_config("w0", listen="127.0.0.1:1", members={"w0": "x:1"})

    chosen = config(bucket_bytes=4096, micro_batch=8)
    assert (chosen.bucket_bytes, chosen.micro_batch) == (4096, 8)
    default = config()
    assert (default.bucket_bytes, default.micro_batch) == (BUCKET_BYTES, 64)


def live_digests(report: dict) -> dict[str, str]:
    """Final state SHA-256 of every worker that trained to the end."""
    return {p["name"]: p["state_sha256"] for p in report["processes"] if p["state_sha256"]}


@pytest.mark.parametrize("mode", ["observe", "copy"])
def test_join_keeps_the_trajectory_and_the_state_bit_identical(baseline, tmp_path, mode):
    # Plans use measured links: over loopback-fast links the greedy rightly pulls the
    # ~80 kB state from one source, so the links are shaped to make a split worth it.
    # A state quorum of 2 changes nothing for an honest job of five incumbents: the pull
    # has two sources that seal the same manifest, the copy a witness.
    joined = run_job(
        tmp_path,
        "join",
        *LIKE_BASELINE,
        "--churn",
        "join@10",
        "--join-mode",
        mode,
        "--links",
        "*=8MB/s",
        "--state-quorum",
        "2",
    )
    assert_same_losses(joined["loss_curve"], baseline["loss_curve"])
    (event,) = joined["events"]
    assert event["type"] == "join" and event["worker"] == "w5"
    assert event["scale_out_delay_s"] is not None and event["scale_out_delay_s"] > 0
    assert joined["members_curve"][-1][1] == 6
    (join,) = joined["joins"]
    assert join["path"] == {"observe": "observer", "copy": "stop-and-copy"}[mode]
    if mode == "observe":
        assert sum(join["bytes_per_source"].values()) > 0
        assert len([n for n in join["bytes_per_source"].values() if n]) > 1  # several sources
    digests = live_digests(joined)
    assert set(digests) == {f"w{i}" for i in range(6)}
    assert len(set(digests.values())) == 1


def test_join_survives_a_source_crash_mid_transfer() -> None:
    """w1's link to the newcomer is slow, so its share is still in flight when it dies.

    The newcomer does not time its downlinks first (`join_probe_frames=0`): that phase
    lasts a wall-clock time, a few steps on a busy machine but dozens on a quiet one, and a
    crash at a fixed step could then come before the plan. Without it the plan follows the
    join request at once, and the link is slow enough (w1's equal share takes seconds) for
    the crash 14 steps later to find w1's share still in flight. The trainers do not wait
    for the join, so the run ends once the newcomer trained (`stop_after_join_steps`), not
    at a step a loaded machine may reach first; its losses are compared with a churn-free
    run stopped at the same step.
    """
    options = JobOptions(
        entry=EXAMPLES["digits"],
        example="digits",
        workers=5,
        steps=1_000_000,
        dtype="float64",
        churn=parse_churn("join@10,crash:w1@24", 5),
        links="w1-w5=2KB/s",
        join_strategy="equal",
        stop_after_join_steps=10,
    )
    # the digits example trains 200 steps (the default backlog) in about a second on a
    # quiet machine, less than the pull's re-plan after the crash: then the newcomer
    # rightly falls back to a copy (CI5), which is not what this test is about
    joined = asyncio.run(_Settings(options, observer_max_backlog=100_000).run()).model_dump()
    done = joined["steps"]
    assert joined["problems"] == [f"only {done} of 1000000 steps completed"]
    reference = stopped_at(replace(options, churn=[], stop_after_join_steps=None), done)
    assert_same_losses(joined["loss_curve"], reference["loss_curve"][:done])
    (join,) = joined["joins"]
    assert join["path"] == "observer"
    assert join["replans"] >= 1
    assert join["bytes_per_source"]["w1"] == 0  # w1's shards came from the others
    assert [c["removed"] for c in joined["membership"] if c["removed"]] == [["w1"]]
    assert [c["added"] for c in joined["membership"] if c["added"]] == [["w5"]]


def test_a_newcomer_whose_stream_overflows_falls_back_without_stalling_anyone() -> None:
    """w1's link to the newcomer is slow and w1 serves an equal share, so the root (w0)
    streams more totals than the newcomer may hold while it pulls. A total it had to
    refuse is one it can never replay: it must not ask for a switch step (the members
    would wait there for a member that cannot come, until its join's patience ran out and
    it withdrew, a crash in the report), but fall back to a stop-and-copy join at once.
    The losses stay those of the churn-free run."""
    options = JobOptions(
        entry=EXAMPLES["digits"],
        example="digits",
        workers=3,
        steps=1_000_000,
        dtype="float64",
        churn=parse_churn("join@10", 3),
        links="w1-w3=5KB/s",
        join_strategy="equal",
        stop_after_join_steps=10,
    )
    # 5 totals: a pull of a few seconds always outlasts them
    joined = asyncio.run(_Settings(options, observer_max_backlog=5).run()).model_dump()
    done = joined["steps"]
    reference = stopped_at(replace(options, churn=[], stop_after_join_steps=None), done)
    assert_same_losses(joined["loss_curve"], reference["loss_curve"][:done])
    assert [j["path"] for j in joined["joins"]] == ["stop-and-copy"]
    assert [e["type"] for e in joined["events"]] == ["join"]  # no withdrawal, no crash


def run_until_joined(tmp_path: Path, argv: list[str], joined_steps: int = 10) -> dict:
    """The report of `chaos run ARGV`, run in this process with its run directory kept
    under `tmp_path`, ended once every newcomer trained `joined_steps` steps: the trainers
    do not wait for a join, so a run of a fixed number of steps could end before it did
    on a loaded machine. ARGV's `--steps` is only an upper bound."""
    options = options_from(build_parser().parse_args(argv))
    options = replace(options, stop_after_join_steps=joined_steps)
    env = {"TMPDIR": str(tmp_path), KEEP_RUN_DIR: "1"}
    with mock.patch.dict(os.environ, env), mock.patch.object(tempfile, "tempdir", None):
        return asyncio.run(LocalRun(options).run()).model_dump()


def stopped_at(options: JobOptions, steps: int) -> dict:
    """The report of `options` run until `steps` steps are complete."""

    def stop_when_done(run: LocalRun) -> None:
        if run.max_step >= steps - 1:
            run.stop()

    return asyncio.run(LocalRun(options, on_update=stop_when_done).run()).model_dump()


def test_a_run_under_a_tmpdir_too_deep_for_a_unix_socket(tmp_path):
    """The run directory under TMPDIR holds the control socket, unless that path is longer
    than a Unix socket's (107 bytes): then the socket gets a private directory of its own
    under /tmp, removed with the run."""
    deep = tmp_path / ("d" * 60) / ("e" * 60)
    deep.mkdir(parents=True)
    before = set(Path("/tmp").glob("chaos-ctl-*"))
    report = run_job(
        deep, "deep", "--workers", "2", "--steps", "5", "--churn", "none", env=in_tmp(deep)
    )
    assert report["steps"] == 5
    assert set(Path("/tmp").glob("chaos-ctl-*")) <= before


def test_silent_crash_is_found_by_heartbeat_timeout(baseline, tmp_path):
    hung = run_job(
        tmp_path,
        "hang",
        *LIKE_BASELINE,
        "--churn",
        "hang:w3@12",
        "--failure-timeout",
        "0.5",
        env=in_tmp(tmp_path),
    )
    assert_same_losses(hung["loss_curve"], baseline["loss_curve"])
    (event,) = hung["events"]
    assert event["type"] == "crash" and event["detail"].startswith("detected after")
    assert leftover_workers(tmp_path) == []


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--churn", "crash:w9@3"], "w9"),
        (["--churn", "explode:w1@3"], "explode"),
        (["--churn", "crash:w1@500", "--steps", "10"], "before the last step"),
        (["--churn", "crash:w1@3,crash:w1@5"], "'crash:w1@5' names w1, which crashed at step 3"),
        (["--churn", "crash:w1@3,leave:w1@5"], "'leave:w1@5' names w1, which crashed at step 3"),
        (["--churn", "hang:w1@5,crash:w1@3"], "'hang:w1@5' names w1, which crashed at step 3"),
        (["--churn", "leave:w2@3,join:w2@5"], "'join:w2@5' joins w2, which already exists"),
        (["--churn", "link-up:w0-w1@3"], "the link w0-w1 is not down"),
        (["--workers", "1", "--churn", "crash:w0@3"], "leaves no worker"),
        (["--entry", "tests.unit.badfactories:raises"], "raise"),
        (["--entry", f"{BAD}:raises_base_exception"], f"{BAD}:raises_base_exception: raised Stop"),
        (["--entry", f"{BAD}:raises_keyboard_interrupt"], "raised KeyboardInterrupt"),
        (["--entry", f"{BAD}:exits"], f"loading {BAD}:exits: the factory exited with code 3"),
        (["--entry", f"{BAD}:exits_hard"], "the factory exited with code 0"),
        (["--entry", f"{BAD}:kills_itself"], "the factory was killed by signal SIGKILL"),
        (["--entry", f"{BAD}:hangs", "--load-timeout", "2"], f"{BAD}:hangs: timed out after 2 s"),
        (["--load-timeout", "0"], "--load-timeout must be a positive"),
        (["--load-timeout", "nan"], "--load-timeout must be a positive"),
        (["--entry", "no_such_module_xyz:factory"], "no_such_module_xyz"),
        (["--example", "nope"], "nope"),
        (["--workers", "0"], "--workers"),
        (["--workers", "10000"], "--workers must lie in 1..64"),
        (["--workers", "many"], "argument --workers: invalid int value: 'many'"),
        (["--workers", "60", "--churn", ",".join(f"join@{s}" for s in range(1, 6))], "at most 64"),
        (["--global-batch", str(10**21)], "--global-batch must lie in 1..16777216"),
        (["--device", "tpu"], "--device"),
        (["--report", "/proc/no-such-dir/report.json"], "--report"),
        (["--report", "out.png"], "--plot out.png is the --report file"),
        (["--links", "w0-w9=1MB/s"], "w9"),
        (["--links", "w0-w1="], "empty shape"),
        (["--downlink", "w7=1MB/s"], "w7"),
        (["--seed", "-1"], "--seed"),
        (["--failure-timeout", "inf"], "finite"),
        (["--bucket-mb", "0"], "argument --bucket-mb: must be 1/1024 (1 KiB) to 1024 MiB, got 0"),
        (["--bucket-mb", "four"], "argument --bucket-mb: expected MiB such as 4 or 0.5"),
        (["--micro-batch", "0"], "argument --micro-batch: must be >= 1, got 0"),
        (["--micro-batch", str(1 << 30)], "--micro-batch must lie in 1..16777216"),
    ],
)
def test_bad_input_is_one_clear_line_and_leaves_nothing(args, needle, tmp_path):
    result = chaos("run", "--quiet", "--steps", "10", *args, cwd=Path.cwd(), env=in_tmp(tmp_path))
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], result.stderr
    assert "Traceback" not in result.stderr
    assert leftover_workers(tmp_path) == []
    assert not list(tmp_path.glob("chaos-run-*")), "a run directory was made: workers started"


def test_taken_port_is_reported(tmp_path):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        port = sock.getsockname()[1]
        result = chaos(
            "run",
            "--quiet",
            "--workers",
            "2",
            "--steps",
            "5",
            "--base-port",
            str(port),
            cwd=tmp_path,
            env=in_tmp(tmp_path),
        )
    assert result.returncode == 2
    assert f"port {port}" in result.stderr and "taken" in result.stderr
    assert "Traceback" not in result.stderr
    assert leftover_workers(tmp_path) == []


def test_a_member_whose_gradient_is_not_finite_stops_the_run_with_one_line(tmp_path):
    """Every receiver refuses a NaN or an infinity in a gradient bucket (docs/security.md),
    so a member whose own gradient is not finite (here: a sample holds a NaN) must not send
    it and wait: it stops, and the run fails (exit 1, not 2: the input was valid) naming the
    step and the cause."""
    result = chaos(
        "run", "--quiet", "--entry", f"{BAD}:nan_sample", "--workers", "2", "--steps", "20",
        "--global-batch", "8", cwd=Path.cwd(), env=in_tmp(tmp_path),
    )  # fmt: skip
    assert result.returncode == 1, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "is not finite" in lines[0], result.stderr
    assert lines[0].startswith("chaos run: failed: worker w"), lines[0]
    assert leftover_workers(tmp_path) == []


def test_members_ports_lie_below_the_ephemeral_range():
    """A port picked for a member stays free until the member binds it only if no
    outgoing connection can take it as its source port meanwhile."""
    from chaos_cli.local.ports import LOWEST_PORT, _ephemeral_low, free_ports

    ports = free_ports(32, 0)
    assert len(set(ports)) == 32
    assert all(LOWEST_PORT <= p < _ephemeral_low() for p in ports), ports


def test_ports_drawn_one_at_a_time_are_never_the_same_before_they_are_bound():
    """A joiner's address or a metrics port is drawn after the members' and bound later;
    so are two operators' ports in a test. 600 single draws from the ~12,800 ports below
    the ephemeral range would repeat one almost surely (the birthday bound) unless the
    ports handed out are kept apart."""
    from chaos_cli.local.ports import free_ports

    ports = [free_ports(1, 0)[0] for _ in range(600)]
    assert len(set(ports)) == len(ports)
