"""Snapshot files only their owner can read, and private directories that do not outlive it.

Snapshot slots hold the whole training state, so they are created with mode 0600 in
directories of mode 0700 (`write_atomically`, `create_file`, `PrivateDirectory`). Slot
files are allocated when created (`create_file`): a full tmpfs refuses them then
(`NoRoom`) rather than killing with SIGBUS the process that writes to the mapping later.

A worker without a configured snapshot directory makes its own, `chaos-<id>-<pid>-XXXXXXXX`
in /dev/shm (memory) where it can, and holds an exclusive `flock` on `owner.lock` in it for
as long as the process lives. The kernel drops that lock when the process dies, however it
dies (SIGKILL, the OOM killer), so a directory whose lock can be taken is provably dead:
the next worker to start removes those (`reap`). Directories without the lock file (another
tool's, an older version's) or whose lock is held (a live run's) are left alone.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import shutil
import stat
import tempfile
from pathlib import Path

log = logging.getLogger(__name__)

FILE_MODE = 0o600
DIR_MODE = 0o700
PREFIX = "chaos-"
LOCK = "owner.lock"
SHM = Path("/dev/shm")


def write_atomically(path: Path, data: bytes) -> None:
    """Replace `path` by `data` (mode 0600) at once: a reader never sees half of it."""
    partial = path.with_name(f".{path.name}.{os.getpid()}")
    fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, FILE_MODE)
    with open(fd, "wb") as handle:
        handle.write(data)
    os.replace(partial, path)


class NoRoom(Exception):
    """A filesystem has no room for the snapshot slots (the message is one line)."""


def mib(size: int) -> str:
    """`size` bytes in MiB, for messages."""
    return f"{size / 2**20:.1f} MiB"


def create_file(path: Path, size: int) -> None:
    """Create (or empty) `path` with mode 0600 and give it `size` bytes (zeros), allocated
    now where the filesystem can. NoRoom if it is full: the file is removed then."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, FILE_MODE)
    try:
        os.ftruncate(fd, size)
        _allocate(fd, size)
    except OSError as exc:
        path.unlink(missing_ok=True)
        if exc.errno == errno.ENOSPC:
            raise NoRoom(f"{path.parent} has no room left for {path.name} ({mib(size)})") from None
        raise
    finally:
        os.close(fd)


def _allocate(fd: int, size: int) -> None:
    """Give the file `fd` its `size` bytes now (`posix_fallocate`), where the filesystem
    can; one that cannot keeps it sparse, as `ftruncate` left it."""
    try:
        os.posix_fallocate(fd, 0, size)
    except OSError as exc:
        if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
            raise


class PrivateDirectory:
    """A directory of this process's own, locked while it lives (see the module docstring)."""

    def __init__(self, path: Path, lock: int) -> None:
        self.path = path
        self._lock = lock

    @classmethod
    def create(cls, me: str, base: Path | None = None) -> PrivateDirectory:
        """Remove the dead directories in `base` (default: /dev/shm where writable, else
        the temporary directory), then make this process's own there."""
        where = base if base is not None else default_base()
        reap(where)
        path = Path(tempfile.mkdtemp(prefix=f"{PREFIX}{me}-{os.getpid()}-", dir=where))
        # locked before it has its name: a reaper never finds it unlocked
        partial = path / f".{LOCK}.new"
        lock = os.open(partial, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, FILE_MODE)
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.rename(partial, path / LOCK)
        return cls(path, lock)

    def remove(self) -> None:
        """Delete the directory, then let go of it (idempotent)."""
        shutil.rmtree(self.path, ignore_errors=True)
        if self._lock >= 0:
            os.close(self._lock)
            self._lock = -1


def default_base() -> Path | None:
    """/dev/shm where this process may write there, else None (the temporary directory)."""
    return SHM if SHM.is_dir() and os.access(SHM, os.W_OK) else None


def reap(base: Path | None) -> list[Path]:
    """Remove the private directories in `base` whose owner is dead; the ones removed."""
    base = Path(base if base is not None else tempfile.gettempdir())
    try:
        entries = [e for e in base.iterdir() if e.name.startswith(PREFIX)]
    except OSError:
        return []
    removed = []
    for entry in entries:
        with contextlib.suppress(OSError):
            info = entry.lstat()
            if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid():
                continue
            lock = os.open(entry / LOCK, os.O_RDONLY | os.O_NOFOLLOW)  # none: not ours
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)  # held: its owner lives
                shutil.rmtree(entry, ignore_errors=True)
                removed.append(entry)
            finally:
                os.close(lock)
    if removed:
        log.info("removed %d snapshot directories of dead workers: %s", len(removed), removed)
    return removed
