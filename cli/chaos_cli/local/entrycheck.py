"""Load a job's entry once, in a child process, before `chaos run` starts any worker.

A child survives what loading in the launcher would not: a factory (or its module) that
calls `os._exit` or `sys.exit`, raises a BaseException such as KeyboardInterrupt, or never
returns. Each is one line, and a child still loading after the timeout is killed with
whatever it started. The child runs as a worker does (`python -m`, one OpenMP thread), so
it finds the same modules.

The child (`python -m chaos_cli.local.entrycheck JSON`) sends its outcome as one JSON line
on a copy of its stdout; the job's own output goes to /dev/null.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
from collections.abc import Mapping


def load_error(
    entry: str,
    *,
    seed: int,
    dtype: str,
    device: str,
    timeout_s: float,
    env: Mapping[str, str] | None = None,
) -> str | None:
    """None when `entry` loads as a worker would load it (with `env` added to ours); else
    one line saying why not."""
    from chaos_worker.priority import die_with_parent

    job = json.dumps({"entry": entry, "seed": seed, "dtype": dtype, "device": device})
    proc = subprocess.Popen(
        [sys.executable, "-m", "chaos_cli.local.entrycheck", job],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        env={**os.environ, **(env or {}), "OMP_NUM_THREADS": "1"},
        start_new_session=True,  # a group of its own, to be killed with what it started
        preexec_fn=die_with_parent(),
    )
    try:
        out, _ = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return f"loading {entry}: timed out after {timeout_s:g} s"
    finally:
        if proc.returncode is None:  # timed out or interrupted
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    outcome = _outcome(out)
    if "error" in outcome:
        return outcome["error"]
    code = outcome.get("exit", proc.returncode)
    if code < 0:
        name = str(-code)
        with contextlib.suppress(ValueError):
            name = signal.Signals(-code).name
        return f"loading {entry}: the factory was killed by signal {name}"
    return f"loading {entry}: the factory exited with code {code}"


def _outcome(out: bytes) -> dict:
    """The child's outcome (its last line), or {} when it ended without one."""
    try:
        outcome = json.loads(out.decode(errors="replace").splitlines()[-1])
    except (ValueError, IndexError):
        return {}
    return outcome if isinstance(outcome, dict) else {}


def _child(job: dict) -> dict:
    """Load the entry here; the outcome as `{"error": line or None}` or `{"exit": code}`."""
    import torch
    from chaos_worker.process import pick_device
    from chaos_worker.training.trainspec import FactoryError, describe_error, load_trainspec

    entry = job["entry"]
    try:
        load_trainspec(
            entry,
            seed=job["seed"],
            dtype=getattr(torch, job["dtype"]),
            device=pick_device(job["device"]),
        )
    except FactoryError as exc:
        return {"error": str(exc)}
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else int(exc.code is not None)
        return {"exit": code}
    except BaseException as exc:  # KeyboardInterrupt, GeneratorExit, one of its own
        return {"error": f"loading {entry}: raised {describe_error(exc)}"}
    return {"error": None}


if __name__ == "__main__":
    report = os.fdopen(os.dup(1), "w")  # not inherited by what the job starts
    os.dup2(os.open(os.devnull, os.O_WRONLY), 1)
    report.write(json.dumps(_child(json.loads(sys.argv[1]))) + "\n")
    report.flush()
    os._exit(0)  # now: not after the job's threads or atexit handlers
