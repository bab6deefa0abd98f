"""Durable checkpoints: the training state of one step on disk, verified before use.

A checkpoint is a directory `step-<8 digits>` under a checkpoint root, holding

* `state.safetensors`: every tensor of the snapshot (model parameters and buffers, optimizer
  state), named by its key in the snapshot layout joined with `/` (`model/fc1.weight`,
  `optim/0/momentum_buffer`);
* `manifest.json`, written last: format and version, the step (the state in force at the
  start of that step, after `step` optimizer steps), whether it is the run's final state,
  the snapshot `Layout` (keys, dtypes, shapes, optimizer param groups and scalars), the
  training dtype, the job's entry, seed and global batch (a resumed run must have the same to
  follow the same trajectory), and the size and SHA-256 of every file.

It is written under a temporary name (`.tmp-step-...`) and renamed when complete, so a crash
mid-write never leaves a directory that looks like a checkpoint. Nothing read back is
trusted before its size is bounded and its SHA-256 checked against the manifest; the
safetensors header must then name exactly the manifest's tensors. Sampler and RNG state
need no saving: sample ids and per-sample randomness are pure functions of
`(seed, step, sample id)` (`training/sampling.py`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import shutil
import stat
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from chaos_worker.replication.private import DIR_MODE, FILE_MODE
from chaos_worker.replication.snapshot import Layout, load_from

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

FORMAT = "chaos-checkpoint"
VERSION = 1
MANIFEST = "manifest.json"
STATE = "state.safetensors"
MAX_MANIFEST_BYTES = 16 << 20
"""The largest manifest read back (a layout of some hundred thousand tensors)."""
STALE_TMP_S = 3600.0
"""A temporary checkpoint directory untouched this long was left by a dead writer."""
NAME = re.compile(r"^step-(\d{8,})$")


class CheckpointError(Exception):
    """A checkpoint that is missing, incomplete or corrupt; the message says why."""


class FileEntry(BaseModel):
    """Size and SHA-256 of one file of a checkpoint."""

    model_config = ConfigDict(extra="forbid")

    bytes: int = Field(ge=0)
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")


class Manifest(BaseModel):
    """What `manifest.json` says (see the module docstring)."""

    model_config = ConfigDict(extra="forbid")

    format: Literal["chaos-checkpoint"] = FORMAT
    version: int
    step: int = Field(ge=0)
    final: bool = False
    dtype: str
    created: float = Field(description="seconds since the epoch, when it was written")
    layout: Layout
    files: dict[str, FileEntry]
    job: dict[str, str | int] = Field(
        default_factory=dict, description="entry, seed, global batch: what the trajectory needs"
    )


def tensor_name(key: list[str | int]) -> str:
    """The safetensors name of a layout key: its parts joined by `/`."""
    return "/".join(str(part) for part in key)


def checkpoint_name(step: int) -> str:
    return f"step-{step:08d}"


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _write_file(path: Path, data: bytes | bytearray | memoryview) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, FILE_MODE)
    with open(fd, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())


SAFETENSORS_DTYPES = {
    "float64": "F64",
    "float32": "F32",
    "float16": "F16",
    "bfloat16": "BF16",
    "int64": "I64",
    "int32": "I32",
    "int16": "I16",
    "int8": "I8",
    "uint8": "U8",
    "bool": "BOOL",
}
"""Layout dtype -> safetensors dtype, for the tensors `write_state` streams itself."""
CHUNK = 16 << 20


def encode_state(layout: Layout, data: bytes | bytearray | memoryview) -> bytes:
    """The safetensors bytes of a flat snapshot buffer `data` laid out by `layout` (through
    the safetensors library: a whole second copy; for dtypes `write_state` does not know)."""
    import torch
    from safetensors.torch import save

    with warnings.catch_warnings():  # a read-only snapshot view: only read here
        warnings.simplefilter("ignore", UserWarning)
        flat = torch.frombuffer(data, dtype=torch.uint8, count=layout.total_bytes)
    tensors = {}
    for slot in layout.slots:
        raw = flat[slot.offset : slot.offset + slot.nbytes]
        tensors[tensor_name(slot.key)] = raw.view(getattr(torch, slot.dtype)).reshape(slot.shape)
    return save(tensors, metadata={"format": FORMAT})


def _header(layout: Layout) -> bytes:
    """The safetensors header of `layout`'s tensors packed in layout order, length first."""
    header: dict = {"__metadata__": {"format": FORMAT}}
    at = 0
    for slot in layout.slots:
        header[tensor_name(slot.key)] = {
            "dtype": SAFETENSORS_DTYPES[slot.dtype],
            "shape": slot.shape,
            "data_offsets": [at, at + slot.nbytes],
        }
        at += slot.nbytes
    body = json.dumps(header, separators=(",", ":")).encode()
    body += b" " * (-len(body) % 8)
    return len(body).to_bytes(8, "little") + body


def write_state(path: Path, layout: Layout, data: bytes | bytearray | memoryview) -> FileEntry:
    """Write `data` (laid out by `layout`) to `path` as safetensors, hashing as it goes: the
    tensors go straight from the buffer to the file, with no second copy of the state."""
    if any(slot.dtype not in SAFETENSORS_DTYPES for slot in layout.slots):
        state = encode_state(layout, data)
        _write_file(path, state)
        return FileEntry(bytes=len(state), sha256=hashlib.sha256(state).hexdigest())
    view = memoryview(data).cast("B")
    digest = hashlib.sha256()
    size = 0
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, FILE_MODE)
    with open(fd, "wb") as handle:
        parts = [_header(layout)]
        parts += [view[s.offset : s.offset + s.nbytes] for s in layout.slots if s.nbytes]
        for part in parts:
            for start in range(0, len(part), CHUNK):
                chunk = part[start : start + CHUNK]
                digest.update(chunk)
                handle.write(chunk)
                size += len(chunk)
        handle.flush()
        os.fsync(handle.fileno())
    return FileEntry(bytes=size, sha256=digest.hexdigest())


def write_checkpoint(
    root: Path,
    step: int,
    layout: Layout,
    data: bytes | bytearray | memoryview,
    *,
    dtype: str,
    final: bool = False,
    keep: int = 3,
    job: dict[str, str | int] | None = None,
) -> Path:
    """Write the state of `step` (flat `data` in `layout`) as a checkpoint under `root`,
    atomically, then keep only the newest `keep` complete checkpoints. Returns its path."""
    root.mkdir(DIR_MODE, parents=True, exist_ok=True)
    name = checkpoint_name(step)
    target = root / name
    tmp = root / f".tmp-{name}-{os.getpid()}-{time.monotonic_ns()}"
    tmp.mkdir(DIR_MODE)
    try:
        entry = write_state(tmp / STATE, layout, data)
        manifest = Manifest(
            version=VERSION,
            step=step,
            final=final,
            dtype=dtype,
            created=time.time(),
            layout=layout,
            files={STATE: entry},
            job=job or {},
        )
        _write_file(tmp / MANIFEST, manifest.model_dump_json().encode())
        _fsync_dir(tmp)
        if target.exists():  # the same step again (a resumed run): the new copy replaces it
            trash = root / f".tmp-old-{name}-{os.getpid()}-{time.monotonic_ns()}"
            os.rename(target, trash)
            shutil.rmtree(trash, ignore_errors=True)
        os.rename(tmp, target)
        _fsync_dir(root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    prune(root, keep)
    return target


def complete(root: Path) -> list[tuple[int, Path]]:
    """(step, path) of every directory under `root` named like a checkpoint, oldest first
    (named only: `verify` says whether it is one)."""
    found = []
    with contextlib.suppress(OSError):
        for entry in root.iterdir():
            match = NAME.match(entry.name)
            if match and entry.is_dir() and not entry.is_symlink():
                found.append((int(match[1]), entry))
    return sorted(found)


def prune(root: Path, keep: int) -> None:
    """Remove all but the newest `keep` checkpoints, and temporary directories that a dead
    writer left (untouched for `STALE_TMP_S`)."""
    for _, path in complete(root)[: -max(keep, 1)]:
        shutil.rmtree(path, ignore_errors=True)
    now = time.time()
    with contextlib.suppress(OSError):
        for entry in root.iterdir():
            if entry.name.startswith(".tmp-") and entry.is_dir():
                with contextlib.suppress(OSError):
                    if now - entry.stat().st_mtime > STALE_TMP_S:
                        shutil.rmtree(entry, ignore_errors=True)


def _read_bounded(path: Path, limit: int) -> bytes:
    """The bytes of regular file `path`, refusing links and anything over `limit`."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except FileNotFoundError:
        raise CheckpointError(f"{path.name} is missing") from None
    except OSError as exc:
        raise CheckpointError(f"{path.name} cannot be read: {exc.strerror}") from None
    with open(fd, "rb") as handle:
        info = os.fstat(handle.fileno())
        if not stat.S_ISREG(info.st_mode):
            raise CheckpointError(f"{path.name} is not a regular file")
        if info.st_size > limit:
            raise CheckpointError(f"{path.name} holds {info.st_size} bytes, over {limit}")
        return handle.read(limit + 1)


def read_manifest(path: Path) -> Manifest:
    """The manifest of checkpoint directory `path`, parsed and checked (not its files)."""
    if not path.is_dir():
        raise CheckpointError(f"{path} is not a directory")
    raw = _read_bounded(path / MANIFEST, MAX_MANIFEST_BYTES)
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise CheckpointError("manifest.json is not JSON (truncated?)") from None
    if not isinstance(body, dict) or body.get("format") != FORMAT:
        raise CheckpointError("manifest.json is not a chaos checkpoint manifest")
    if body.get("version") != VERSION:
        raise CheckpointError(f"format version {body.get('version')!r}, this reads {VERSION}")
    try:
        manifest = Manifest.model_validate(body)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise CheckpointError(f"manifest.json: {where}: {first['msg']}") from None
    if set(manifest.files) != {STATE}:
        raise CheckpointError(f"manifest.json lists {sorted(manifest.files)}, not [{STATE!r}]")
    return manifest


def verify(path: Path, max_bytes: int) -> tuple[Manifest, dict[str, torch.Tensor]]:
    """Check checkpoint `path` completely and return its manifest and tensors (by layout
    name). CheckpointError, naming the first thing wrong, if it is not a sound checkpoint."""
    from safetensors import SafetensorError
    from safetensors.torch import load

    manifest = read_manifest(path)
    if NAME.match(path.name) and int(NAME.match(path.name)[1]) != manifest.step:
        raise CheckpointError(f"the manifest says step {manifest.step}, the name {path.name}")
    entry = manifest.files[STATE]
    if entry.bytes > max_bytes:
        raise CheckpointError(f"{STATE} is {entry.bytes} bytes, over the limit {max_bytes}")
    data = _read_bounded(path / STATE, entry.bytes)
    if len(data) != entry.bytes:
        raise CheckpointError(f"{STATE} holds {len(data)} bytes, the manifest says {entry.bytes}")
    if hashlib.sha256(data).hexdigest() != entry.sha256:
        raise CheckpointError(f"{STATE}: SHA-256 differs from the manifest's")
    try:
        tensors = load(data)
    except (SafetensorError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"{STATE} does not parse: {exc}") from None
    wanted = {tensor_name(s.key): s for s in manifest.layout.slots}
    if set(tensors) != set(wanted):
        raise CheckpointError(f"{STATE} holds other tensors than the manifest's layout")
    for name, slot in wanted.items():
        tensor = tensors[name]
        if str(tensor.dtype).removeprefix("torch.") != slot.dtype or list(tensor.shape) != list(
            slot.shape
        ):
            raise CheckpointError(f"{STATE}: {name} is not {slot.dtype}{slot.shape}")
    return manifest, tensors


def newest(
    root: Path, max_bytes: int, on_skip: Callable[[Path, str], None] | None = None
) -> tuple[Path, Manifest] | None:
    """The newest checkpoint under `root` that verifies (None if none does); every newer
    one that does not is passed to `on_skip(path, why)` (default: one log line)."""
    for _, path in reversed(complete(root)):
        try:
            manifest, _ = verify(path, max_bytes)
        except CheckpointError as exc:
            if on_skip is not None:
                on_skip(path, str(exc))
            else:
                log.warning("skipping checkpoint %s: %s", path, exc)
            continue
        return path, manifest
    return None


def resolve(path: Path, max_bytes: int, on_skip=None) -> tuple[Path, Manifest]:
    """`path` itself if it is a checkpoint (it must verify), else the newest sound one under
    it. CheckpointError if there is none."""
    if not path.exists():
        raise CheckpointError(f"{path} does not exist")
    if not path.is_dir():
        raise CheckpointError(f"{path} is not a directory")
    if (path / MANIFEST).exists() or NAME.match(path.name):
        manifest, _ = verify(path, max_bytes)
        return path, manifest
    found = newest(path, max_bytes, on_skip)
    if found is None:
        held = len(complete(path))
        why = f"none of its {held} checkpoints verifies" if held else "it holds no checkpoint"
        raise CheckpointError(f"{path}: {why}")
    return found


def flat_state(manifest: Manifest, tensors: dict[str, torch.Tensor]) -> bytearray:
    """The flat snapshot buffer of a verified checkpoint (the inverse of `encode_state`)."""
    import torch

    layout = manifest.layout
    buffer = bytearray(max(layout.total_bytes, 1))
    flat = torch.frombuffer(buffer, dtype=torch.uint8)
    for slot in layout.slots:
        if slot.nbytes:
            src = tensors[tensor_name(slot.key)].contiguous().reshape(-1).view(torch.uint8)
            flat[slot.offset : slot.offset + slot.nbytes].copy_(src)
    return buffer


def mismatch(manifest: Manifest, job: dict[str, str | int]) -> str | None:
    """What of `job` (entry, seed, global batch) differs from the checkpoint's, if anything."""
    for key, value in job.items():
        if key in manifest.job and manifest.job[key] != value:
            return f"it was trained with {key} {manifest.job[key]!r}, this job has {value!r}"
    return None


def load_checkpoint(
    path: Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    device: torch.device,
    max_bytes: int,
    job: dict[str, str | int] | None = None,
) -> Manifest:
    """Verify checkpoint `path` and load it into `model` and `optimizer`; returns its
    manifest (its `step` is the next step to train). With `job`, refuses a checkpoint of
    another entry, seed or global batch."""
    manifest, tensors = verify(path, max_bytes)
    if job and (why := mismatch(manifest, job)):
        raise CheckpointError(f"{path.name}: {why}")
    try:
        load_from(flat_state(manifest, tensors), manifest.layout, model, optimizer, device)
    except (RuntimeError, ValueError, KeyError, AttributeError) as exc:
        raise CheckpointError(f"{path.name} does not fit this model: {exc}") from None
    return manifest


def model_weights(path: Path, max_bytes: int) -> dict[str, torch.Tensor]:
    """The model's `state_dict` (parameters and buffers) of verified checkpoint `path`."""
    manifest, tensors = verify(path, max_bytes)
    return {
        str(slot.key[1]): tensors[tensor_name(slot.key)].contiguous()
        for slot in manifest.layout.slots
        if slot.key[0] == "model"
    }
