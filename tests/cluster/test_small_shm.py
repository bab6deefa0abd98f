"""Snapshot slots with a small /dev/shm (Docker's default is 64 MB): a real `chaos run`
in a mount namespace of its own whose /dev/shm is a 1 MiB tmpfs, and a state of 2 MiB
(`bigstate`), so two slots of it (4.2 MiB) do not fit there.

Needs root and `unshare` (util-linux); otherwise these tests skip with the reason, except
under CI=true as root, where a missing piece fails them. The mounts live in the namespace
only: the machine's /dev/shm is never touched.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.cluster

SMALL = "1m"
STATE = {"CHAOS_STATE_MB": "2"}  # two slots need 4.2 MiB with their metadata
GONE_S = 10.0
"""How long the replicator processes of a run's workers get to remove their directories."""
JOB = ("--quiet", "--workers", "2", "--steps", "20", "--example", "bigstate")


def in_small_shm(
    argv: list[str], cwd: Path, env: dict[str, str], *mounts: Path
) -> subprocess.CompletedProcess[str]:
    """`argv` in a mount namespace whose /dev/shm, and every one of `mounts`, is a tmpfs
    of `SMALL`."""
    script = " && ".join(f"mount -t tmpfs -o size={SMALL} tmpfs {m}" for m in ["/dev/shm", *mounts])
    shell = ["sh", "-c", f'{script} && exec "$@"', "sh"]  # "$@": argv, unquoted by nobody
    return subprocess.run(
        ["unshare", "--mount", "--propagation", "private", *shell, *argv],
        cwd=cwd,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.fixture
def namespaces(tmp_path: Path) -> None:
    """Skip (or, under CI=true as root, fail) unless a mount namespace can be made here."""
    if os.geteuid() != 0:
        why = "needs root to mount a small tmpfs on /dev/shm in a mount namespace"
    elif shutil.which("unshare") is None:
        why = "needs `unshare` (util-linux) for a mount namespace"
    else:
        probe = in_small_shm(["true"], tmp_path, {})
        why = None if probe.returncode == 0 else f"unshare --mount failed: {probe.stderr.strip()}"
    if why is None:
        return
    if os.environ.get("CI") == "true" and os.geteuid() == 0:
        pytest.fail(f"CI=true as root, but {why}")
    pytest.skip(why)


def kept(tmpdir: Path) -> dict[str, str]:
    """The environment of a run whose temporary directory is `tmpdir`, where its run
    directory is kept (workers' stderr included)."""
    return {**STATE, "TMPDIR": str(tmpdir), "CHAOS_KEEP_RUN_DIR": "1"}


def chaos_run(
    tmp_path: Path, tmpdir: Path, *extra: str, mounts: tuple[Path, ...] = ()
) -> subprocess.CompletedProcess[str]:
    """`chaos run JOB EXTRA` with a small /dev/shm and `tmpdir` as its temporary directory."""
    env = kept(tmpdir)
    argv = [sys.executable, "-m", "chaos_cli.main", "run", *JOB, *extra]
    return in_small_shm(argv, tmp_path, env, *mounts)


def worker_stderr(tmpdir: Path) -> dict[str, str]:
    """Each worker's stderr, from the kept run directory."""
    (run_dir,) = tmpdir.glob("chaos-run-*")
    return {path.stem: path.read_text() for path in run_dir.glob("*.stderr")}


FALLBACK = (
    r"WARNING /dev/shm has 1\.0 MiB free, the snapshot slots need 4\.2 MiB: "
    r"they are in {tmpdir}/chaos-{name}-\d+-\w+ instead$"
)


def assert_moved(tmpdir: Path, names: list[str]) -> None:
    """Every worker of `names` logged the move of its slots to `tmpdir`, none left a trace
    or a snapshot directory behind."""
    logs = worker_stderr(tmpdir)
    assert sorted(logs) == names
    for name, text in logs.items():
        line = re.compile(FALLBACK.format(tmpdir=re.escape(str(tmpdir)), name=name))
        assert len([ln for ln in text.splitlines() if line.search(ln)]) == 1, text
        assert "Traceback" not in text, text
    deadline = time.monotonic() + GONE_S  # a killed worker's replicator removes its own
    while list(tmpdir.glob("chaos-w*")) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not list(tmpdir.glob("chaos-w*")), "a snapshot directory outlived its worker"


def test_a_job_trains_to_the_end_with_its_slots_on_disk_when_dev_shm_is_small(
    namespaces, tmp_path: Path
) -> None:
    tmpdir = tmp_path / "tmp"
    tmpdir.mkdir()
    report = tmp_path / "report.json"
    result = chaos_run(tmp_path, tmpdir, "--churn", "none", "--report", str(report))
    assert result.returncode == 0, result.stdout + result.stderr
    body = json.loads(report.read_text())
    assert [s for s, _ in body["loss_curve"]] == list(range(20))
    assert {p["name"]: p["exit_code"] for p in body["processes"]} == {"w0": 0, "w1": 0}
    assert_moved(tmpdir, ["w0", "w1"])


JOIN = """
import asyncio, json, sys
from chaos_cli.local.churn import parse_churn
from chaos_cli.local.launcher import JobOptions, LocalRun
from chaos_worker.examples import EXAMPLES
options = JobOptions(
    entry=EXAMPLES["bigstate"], example="bigstate", workers=2, steps=1_000_000,
    churn=parse_churn("join@5", 2), stop_after_join_steps=5,
)
report = asyncio.run(LocalRun(options).run()).model_dump()
with open(sys.argv[1], "w") as out:
    json.dump(report, out)
"""


def test_a_newcomer_pulls_from_the_slots_moved_to_disk(namespaces, tmp_path: Path) -> None:
    # the trainers do not wait for a join: the run ends once the newcomer trained
    # (`stop_after_join_steps`), not at a step a loaded machine may reach first
    tmpdir = tmp_path / "tmp"
    tmpdir.mkdir()
    report = tmp_path / "report.json"
    result = in_small_shm([sys.executable, "-c", JOIN, str(report)], tmp_path, kept(tmpdir))
    assert result.returncode == 0, result.stdout + result.stderr
    body = json.loads(report.read_text())
    done = body["steps"]
    assert [s for s, _ in body["loss_curve"]] == list(range(done)), "a step was lost"
    (join,) = body["joins"]
    assert join["worker"] == "w2" and join["path"] == "observer"
    # both members' replicators served it, from the directories they moved to
    assert sorted(w for w, n in join["bytes_per_source"].items() if n) == ["w0", "w1"]
    assert_moved(tmpdir, ["w0", "w1", "w2"])


def test_a_worker_with_no_place_for_its_slots_stops_with_one_clear_line(
    namespaces, tmp_path: Path
) -> None:
    tmpdir = tmp_path / "tmp"  # a tmpfs as small as /dev/shm: no place has room
    tmpdir.mkdir()
    result = chaos_run(tmp_path, tmpdir, "--churn", "none", mounts=(tmpdir,))
    assert result.returncode != 0
    output = result.stdout + result.stderr
    # what the launcher says of a failed worker ends with its stderr's last lines, joined
    # by " | ": here one line, and no traceback
    failed = re.search(r"worker (w\d) exited with code 1: (.*)$", output, re.MULTILINE)
    assert failed, output
    line = re.compile(
        rf"chaos worker {failed.group(1)}: error: the snapshot slots need 4\.2 MiB, but "
        rf"/dev/shm has 1\.0 MiB and {re.escape(str(tmpdir))} has [\d.]+ MiB free: give "
        r"/dev/shm more room \(docker run --shm-size\) or set TMPDIR to a disk with room"
    )
    assert line.fullmatch(failed.group(2)), output
    assert "Traceback" not in output


FULL = """
import sys
import time
from pathlib import Path
import torch
from chaos_worker.replication.private import NoRoom
from chaos_worker.replication.snapshot import SnapshotStore
directory = Path("/dev/shm/slots")
model = torch.nn.Linear(1024, 1024)  # 4 MiB of weights: one slot does not fit
try:
    SnapshotStore(directory).publish(1, model, torch.optim.SGD(model.parameters(), lr=0.1))
except NoRoom as exc:
    print(exc, sorted(p.name for p in directory.iterdir() if p.suffix == ".bin"))
"""


def test_a_slot_that_does_not_fit_fails_when_made_not_with_sigbus_later(
    namespaces, tmp_path: Path
) -> None:
    # without the allocation at creation, the copy into the mapping dies of SIGBUS (-7)
    result = in_small_shm([sys.executable, "-c", FULL], tmp_path, {})
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "/dev/shm/slots has no room left for slot-0.bin (4.0 MiB) []"
