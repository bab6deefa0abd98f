"""`scripts/gpu-check.sh` takes its output folder as its argument and refuses anything
else before it starts a step (the full check runs on a GPU machine, or with `--cpu`)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "gpu-check.sh"


def _run(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", str(SCRIPT), *args], cwd=cwd, capture_output=True, text=True, timeout=60
    )


def test_the_help_names_the_output_folder_argument(tmp_path: Path) -> None:
    done = _run("--help", cwd=tmp_path)
    assert done.returncode == 0
    assert "gpu-check.sh --cpu [DIR]" in done.stdout


@pytest.mark.parametrize(
    ("args", "said"),
    [
        (["--bogus"], "unknown option --bogus"),
        (["--cpu", "first", "second"], "one output folder, not"),
    ],
)
def test_bad_arguments_stop_it_with_one_line_and_nothing_written(
    tmp_path: Path, args: list[str], said: str
) -> None:
    done = _run(*args, cwd=tmp_path)
    assert done.returncode == 2
    assert said in done.stderr and "Traceback" not in done.stderr
    assert list(tmp_path.iterdir()) == []
