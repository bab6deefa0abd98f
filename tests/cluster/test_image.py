"""The image without an image builder (none on this machine, docs/operator.md): the Dockerfile's
structure, and its install replayed: the build context it COPYs is built into a wheel and
installed into a clean virtualenv, whose `chaos` entry points then run.

Nothing is downloaded: the wheel is built with the project venv's setuptools
(`pip wheel --no-deps --no-build-isolation --no-index`; `build` is not installed), the clean
virtualenv (`--without-pip`; the project's pip installs into it with `--python`) sees the
project venv's third-party packages, torch included, through a `.pth` file pointing at a
directory of links to them (the project's own editable install and pip left out), and the
wheel is installed with `--no-deps --no-index`; `pip check` then shows that every dependency
the wheel declares is met. The children run without PYTHONPATH, so only the wheel provides
`chaos_*`. Slowish (a wheel build and a venv), hence the `cluster` tier.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import sysconfig
import tomllib
from pathlib import Path

import pytest

pytestmark = pytest.mark.cluster

REPO = Path(__file__).resolve().parents[2]
DOCKERFILE = REPO / "Dockerfile"


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of the Dockerfile, continuation lines joined."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    lines = [line.strip() for line in text.splitlines()]
    return [
        (line.split(None, 1)[0].upper(), line.split(None, 1)[1])
        for line in lines
        if line and not line.startswith("#")
    ]


def copied() -> list[str]:
    """The sources of every COPY (relative to the build context)."""
    out: list[str] = []
    for op, args in instructions():
        if op == "COPY":
            *sources, _ = shlex.split(args)
            out += [s for s in sources if not s.startswith("--")]
    return out


def test_dockerfile_structure() -> None:
    ops = instructions()
    assert ops[0][0] == "FROM" and re.fullmatch(r"python:3\.\d+-slim", ops[0][1]), ops[0]
    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    # every package root the build finds, and the readme it names, reach the image
    where = project["tool"]["setuptools"]["packages"]["find"]["where"]
    assert set(where) | {"pyproject.toml", project["project"]["readme"]} <= set(copied())
    runs = [args for op, args in ops if op == "RUN"]
    assert any("pip install --no-cache-dir ." in r for r in runs)
    user = [args for op, args in ops if op == "USER"]
    uid = re.search(r"useradd --uid (\d+)", " ".join(runs))
    assert uid and user == [uid.group(1)], "runs as the uid it creates (the chart's runAsUser)"
    entry = [json.loads(args) for op, args in ops if op == "ENTRYPOINT"]
    assert entry == [["chaos"]] and "chaos" in project["project"]["scripts"]
    # pinned base, exec-form entry point, no ADD, no latest tag
    assert not any(op == "ADD" for op, _ in ops)
    assert ":latest" not in DOCKERFILE.read_text()


#: The children see only what they install: no PYTHONPATH into the repository.
CLEAN_ENV = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}


def run(
    *argv: str | Path, check: bool = True, timeout: float = 600
) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(
        [str(a) for a in argv], capture_output=True, text=True, timeout=timeout, env=CLEAN_ENV
    )
    if not check:
        return done
    assert done.returncode == 0, f"{argv}: {done.stdout[-2000:]}\n{done.stderr[-3000:]}"
    return done


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A clean venv with the wheel built from what the Dockerfile COPYs; its bin directory."""
    root = tmp_path_factory.mktemp("image")
    context = root / "context"
    context.mkdir()
    for source in copied():
        src, dst = REPO / source, context / source
        if src.is_dir():
            run("cp", "-r", src, dst)
        else:
            run("cp", src, dst)
    # the build backend from the project venv (no download), as `pip install .` would build
    run(sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
        "--no-index", "-w", root / "dist", context)  # fmt: skip
    (wheel,) = (root / "dist").glob("chaos_train-*.whl")
    venv = root / "venv"
    run(sys.executable, "-m", "venv", "--without-pip", venv)  # pip below is the project's
    # the project venv's third-party packages, without its editable install of this project
    deps = root / "deps"
    deps.mkdir()
    site = Path(sysconfig.get_paths()["purelib"])
    for entry in site.iterdir():
        if entry.name.startswith(("__editable__", "chaos_train", "pip", "_distutils_hack")):
            continue
        if entry.suffix == ".pth":
            continue
        (deps / entry.name).symlink_to(entry)
    bin_ = venv / "bin"
    target = run(bin_ / "python", "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])")
    (Path(target.stdout.strip()) / "project-deps.pth").write_text(f"{deps}\n")
    run(sys.executable, "-m", "pip", "--python", bin_ / "python", "install", "--no-deps",
        "--no-index", "--no-cache-dir", wheel)  # fmt: skip
    return bin_


def test_the_wheel_has_what_the_image_runs(installed: Path) -> None:
    where = run(installed / "python", "-c", "import chaos_cli, chaos_operator.api as a; "
                "print(chaos_cli.__file__); print(a.__file__)").stdout  # fmt: skip
    assert str(REPO) not in where and str(installed.parent) in where, where
    # every dependency the wheel declares is met
    run(sys.executable, "-m", "pip", "--python", installed / "python", "check")


def test_entry_points_run(installed: Path, tmp_path: Path) -> None:
    chaos = installed / "chaos"
    assert "usage: chaos" in run(chaos, "--help").stdout
    assert "--namespace" in run(chaos, "operator", "--help").stdout
    assert "--config" in run(chaos, "worker", "--help").stdout
    # the CRDs the installed package generates are the committed ones (its schema file too)
    run(chaos, "crds", "--check", REPO / "crds")
    # a minimal valid worker config: one member that trains one step alone and exits 0
    config = tmp_path / "config.json"
    config.write_text(json.dumps({
        "id": "w0", "listen": "127.0.0.1:0", "entry": "chaos_worker.examples.digits:factory",
        "steps": 1, "members": {"w0": "127.0.0.1:0"}, "snapshot_dir": str(tmp_path / "snap"),
    }))  # fmt: skip
    run(chaos, "worker", "--config", config, timeout=300)
    # a bad config fails cleanly: a message, no traceback
    config.write_text(json.dumps({"id": "w0"}))
    bad = run(chaos, "worker", "--config", config, check=False, timeout=120)
    assert bad.returncode != 0 and "Traceback" not in bad.stderr, bad.stderr[-3000:]
    assert "entry" in bad.stderr + bad.stdout
