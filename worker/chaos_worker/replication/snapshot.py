"""Per-step in-memory snapshots of the training state, double-buffered and shardable.

After the optimizer step of step `s - 1`, a member publishes snapshot `s` (the state in
force at the start of step `s`: parameters, buffers, optimizer state) when a join will pull
it (`want`, from the join's plan) or a checkpoint is due there; other steps copy nothing.
The tensors are copied into one flat byte buffer laid out by a `Layout`; the copy runs in a
thread while the next step computes and is awaited only before the next optimizer step
changes the tensors. Two slots alternate; a slot holding a snapshot that a join is
pulling is pinned and left alone until the join is over, and so is one a checkpoint is
copying out (`hold`). With a directory (memory-backed in
a pod, e.g. /dev/shm) the slots are files that `chaos replicator` in another process serves,
allocated before training where they fit (`replication.space`).

A snapshot is split into `K` shards by byte range (`shard_bounds`); their SHA-256 digests
are computed on demand by the member that produced the snapshot and checked by the newcomer.
Sampler and RNG state need no saving: sample ids and randomness are pure functions of
`(seed, step, sample id)`, and the step is part of the snapshot.
"""

from __future__ import annotations

import collections
import hashlib
import json
import logging
import math
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from pydantic import BaseModel, ConfigDict, ValidationError

from chaos_worker.replication.admission import Admissions
from chaos_worker.replication.private import DIR_MODE, NoRoom, create_file, write_atomically

if TYPE_CHECKING:  # torch is imported where used: `chaos replicator` runs without it
    import torch

_ALIGN = 64
log = logging.getLogger(__name__)


class Slot(BaseModel):
    """Where one tensor lives in the flat buffer; `key` is its path in the state dicts."""

    model_config = ConfigDict(frozen=True)

    key: list[str | int]
    dtype: str
    shape: list[int]
    offset: int
    nbytes: int


class Layout(BaseModel):
    """How a flat snapshot buffer maps back to `model.state_dict()` and the optimizer's."""

    model_config = ConfigDict(frozen=True)

    slots: list[Slot]
    param_groups: list[dict]
    scalars: list[tuple[list[str | int], float | int | bool | None]]
    total_bytes: int


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _tensors(model: torch.nn.Module, optimizer: torch.optim.Optimizer):
    """(key, value) for every entry of the model and optimizer state, in a fixed order."""

    for name, tensor in model.state_dict().items():
        yield ["model", name], tensor
    opt = optimizer.state_dict()
    for index in sorted(opt["state"]):
        for name in sorted(opt["state"][index]):
            yield ["optim", int(index), name], opt["state"][index][name]


def layout_of(
    model: torch.nn.Module, optimizer: torch.optim.Optimizer
) -> tuple[Layout, list[torch.Tensor]]:
    """The layout of the current state and its tensors in layout order."""
    import torch

    slots: list[Slot] = []
    tensors: list[torch.Tensor] = []
    scalars: list[tuple[list[str | int], float | int | bool | None]] = []
    offset = 0
    for key, value in _tensors(model, optimizer):
        if not isinstance(value, torch.Tensor):
            scalars.append((key, value))
            continue
        nbytes = value.numel() * value.element_size()
        slots.append(
            Slot(
                key=key,
                dtype=_dtype_name(value.dtype),
                shape=list(value.shape),
                offset=offset,
                nbytes=nbytes,
            )
        )
        tensors.append(value)
        offset += -(-nbytes // _ALIGN) * _ALIGN
    groups = json.loads(json.dumps(optimizer.state_dict()["param_groups"], default=list))
    return Layout(slots=slots, param_groups=groups, scalars=scalars, total_bytes=offset), tensors


def _identity(tensor: torch.Tensor) -> tuple[int, int]:
    """Storage address and in-place version: equal exactly when the data has not changed."""
    return tensor.data_ptr(), tensor._version


def copy_into(
    buffer: memoryview | np.ndarray,
    layout: Layout,
    tensors: list[torch.Tensor],
    held: list[tuple[int, int] | None] | None = None,
    always: frozenset[int] = frozenset(),
) -> list[tuple[int, int]]:
    """Copy `tensors` into `buffer` at their slots (releases the GIL for the data).

    `held` lists what the buffer already holds per tensor (from an earlier call on the same
    buffer): tensors unchanged since then (frozen weights, buffers) are not copied again,
    except those whose storage address is in `always` (trainable parameters and optimizer
    state, which an optimizer may change through `.data` without a version bump).
    Returns the identities now held.
    """
    import torch

    flat = torch.frombuffer(buffer, dtype=torch.uint8, count=layout.total_bytes)
    now = []
    for i, (slot, tensor) in enumerate(zip(layout.slots, tensors, strict=True)):
        identity = _identity(tensor)
        now.append(identity)
        fresh = held is not None and held[i] == identity and identity[0] not in always
        if slot.nbytes and not fresh:
            src = tensor.detach().reshape(-1).view(torch.uint8)
            flat[slot.offset : slot.offset + slot.nbytes].copy_(src)
    return now


def _always_copied(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> frozenset[int]:
    """Storage addresses of trainable parameters and optimizer state tensors."""
    import torch

    addresses = {p.data_ptr() for p in model.parameters() if p.requires_grad}
    for state in optimizer.state.values():
        addresses.update(v.data_ptr() for v in state.values() if isinstance(v, torch.Tensor))
    return frozenset(addresses)


def load_from(
    buffer: bytes | bytearray | memoryview | np.ndarray,
    layout: Layout,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    device: torch.device,
) -> None:
    """Load a snapshot buffer into `model` and `optimizer` (the inverse of `copy_into`).

    Tensors are views of `buffer` (no copy here: `load_state_dict` copies parameters into
    place, while buffers and optimizer state keep the views), so do not reuse `buffer`
    afterwards.
    """
    import torch

    array = buffer if isinstance(buffer, np.ndarray) else np.frombuffer(buffer, np.uint8)
    if not array.flags.writeable:  # the optimizer state keeps views: give it its own bytes
        array = array.copy()  # numpy copies without the GIL
    flat = torch.from_numpy(array.reshape(-1).view(np.uint8))[: layout.total_bytes]
    model_state: dict[str, torch.Tensor] = {}
    optim_state: dict[int, dict] = {}
    for slot in layout.slots:
        dtype = getattr(torch, slot.dtype)
        raw = flat[slot.offset : slot.offset + slot.nbytes]
        tensor = raw.view(dtype).reshape(slot.shape).to(device)
        if slot.key[0] == "model":
            model_state[str(slot.key[1])] = tensor
        else:
            optim_state.setdefault(int(slot.key[1]), {})[str(slot.key[2])] = (
                tensor.cpu() if tensor.dim() == 0 and slot.key[2] == "step" else tensor
            )
    for key, value in layout.scalars:
        if key[0] == "optim":
            optim_state.setdefault(int(key[1]), {})[str(key[2])] = value
    adopted = _adopt_buffers(model, model_state)
    missing, unexpected = model.load_state_dict(model_state, strict=False)
    if unexpected or set(missing) - adopted:
        raise RuntimeError(
            f"snapshot does not fit the model: missing {sorted(set(missing) - adopted)}, "
            f"unexpected {sorted(unexpected)}"
        )
    optimizer.load_state_dict({"state": optim_state, "param_groups": layout.param_groups})


def fresh_bytes(nbytes: int) -> np.ndarray:
    """A new uninitialised byte buffer for a whole state, from torch's allocator: numpy
    asks the kernel for huge pages of a buffer this large, and where memory is fragmented
    its first touch then waits on compaction (600 MB took 0.1-1.2 s here, 0.14 s from
    torch)."""
    import torch

    return torch.empty(nbytes, dtype=torch.uint8).numpy()


def layout_fault(layout: Layout, size: int) -> str | None:
    """Why `layout` does not describe a state of `size` bytes that `load_from` can read
    (None: it does): every slot a known dtype and within the buffer, its bytes its shape's."""
    import torch

    if layout.total_bytes != size:
        return f"its layout says {layout.total_bytes} bytes, not {size}"
    for slot in layout.slots:
        dtype = getattr(torch, slot.dtype, None)
        if not isinstance(dtype, torch.dtype):
            return f"{slot.key}: no dtype {slot.dtype!r}"
        if any(n < 0 for n in slot.shape) or len(slot.shape) > 64:
            return f"{slot.key}: shape {slot.shape}"
        if slot.nbytes != math.prod(slot.shape) * dtype.itemsize:
            return f"{slot.key}: {slot.nbytes} bytes for shape {slot.shape} of {slot.dtype}"
        if slot.offset < 0 or slot.offset + slot.nbytes > size:
            return f"{slot.key}: bytes {slot.offset}+{slot.nbytes} past {size}"
        if slot.key[0] != "model" and not (
            slot.key[0] == "optim" and len(slot.key) == 3 and isinstance(slot.key[1], int)
        ):
            return f"{slot.key}: not a model or optimizer entry"
    return None


def checked_layout(raw: dict, size: int | None = None) -> Layout:
    """Another member's layout, as one `load_from` can read from `size` bytes (its own
    total when None); ValueError saying why not."""
    try:
        layout = Layout.model_validate(raw)
    except ValidationError as exc:
        raise ValueError(f"not a layout ({exc.error_count()} errors)") from None
    fault = layout_fault(layout, layout.total_bytes if size is None else size)
    if fault is not None:
        raise ValueError(fault)
    return layout


def copied_by_load(model: torch.nn.Module, state_bytes: int, device: torch.device) -> int:
    """Bytes `load_from` copies for a state of `state_bytes`: into the parameters on a
    CPU (buffers and optimizer state become views of the pulled bytes), all of it onto
    an accelerator."""
    if device.type != "cpu":
        return state_bytes
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    return min(state_bytes, params)


def _adopt_buffers(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> set[str]:
    """Make the model's buffers (frozen tables, running statistics) the snapshot's tensors
    themselves instead of copying into them, and take them out of `state`: loading a
    state whose bulk is frozen then costs no copy. A buffer that two modules share keeps
    its storage (it is copied into). Returns the keys adopted."""
    owners = collections.Counter(t.data_ptr() for t in model.state_dict().values())
    adopted = set()
    for key in list(state):
        path, _, name = key.rpartition(".")
        module = model.get_submodule(path)
        current = module._buffers.get(name)
        if current is None or owners[current.data_ptr()] != 1:
            continue
        if current.dtype != state[key].dtype or current.shape != state[key].shape:
            continue  # let load_state_dict say what does not fit
        module._buffers[name] = state.pop(key)
        adopted.add(key)
    return adopted


def state_digest(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> str:
    """SHA-256 of the flat state: equal on two members exactly when their states are equal.

    The tensors are hashed where they lie, slot by slot with the buffer's zero padding
    between them (the digest of the flat buffer, without a copy of the whole state);
    `hashlib` releases the GIL for the data."""
    import torch

    layout, tensors = layout_of(model, optimizer)
    digest = hashlib.sha256()
    end = 0
    for slot, tensor in zip(layout.slots, tensors, strict=True):
        digest.update(bytes(slot.offset - end))
        if slot.nbytes:
            flat = tensor.detach().reshape(-1).view(torch.uint8)
            digest.update(flat.cpu().numpy().data)
        end = slot.offset + slot.nbytes
    digest.update(bytes(layout.total_bytes - end))
    digest.update(layout.model_dump_json().encode())
    return digest.hexdigest()


def _write_json(path: Path, body: dict) -> None:
    """Replace `path` atomically: a reader in another process never sees half of it."""
    write_atomically(path, json.dumps(body).encode())


def slot_file(directory: Path, index: int) -> Path:
    """The file of slot `index` in a snapshot directory."""
    return directory / f"slot-{index}.bin"


def shard_bounds(total_bytes: int, shards: int, index: int) -> tuple[int, int]:
    """Byte range [start, end) of shard `index` of `shards`."""
    return index * total_bytes // shards, (index + 1) * total_bytes // shards


@dataclass
class Snapshot:
    """One published snapshot: read-only while its slot is pinned."""

    step: int
    layout: Layout
    data: memoryview
    hashes: dict[int, list[str]] = field(default_factory=dict)
    _hashing: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def shard(self, shards: int, index: int) -> memoryview:
        start, end = shard_bounds(self.layout.total_bytes, shards, index)
        return self.data[start:end]

    def shard_hashes(self, shards: int) -> list[str]:
        """SHA-256 of every shard for a split into `shards` (computed once per split, by
        the first thread that asks; the others wait for it)."""
        with self._hashing:
            return self._hash_split(shards)

    def _hash_split(self, shards: int) -> list[str]:
        if shards not in self.hashes:
            self.hashes[shards] = [
                hashlib.sha256(self.shard(shards, i)).hexdigest() for i in range(shards)
            ]
        return self.hashes[shards]


class _Buffer:
    """One slot's bytes: a file mapping in a directory, or anonymous memory."""

    def __init__(self, size: int, path: Path | None) -> None:
        self.size = size
        self.path = path
        if path is None:
            self.array = np.zeros(max(size, 1), dtype=np.uint8)
        else:
            create_file(path, max(size, 1))
            self.array = np.memmap(path, dtype=np.uint8, mode="r+", shape=(max(size, 1),))

    @property
    def view(self) -> memoryview:
        return memoryview(self.array)[: self.size]


class SnapshotStore:
    """Two snapshot slots of one member; see the module docstring."""

    def __init__(self, directory: Path | None = None) -> None:
        self.directory = directory
        if directory is not None:
            directory.mkdir(DIR_MODE, parents=True, exist_ok=True)
        self._buffers: list[_Buffer | None] = [None, None]
        # per slot: the layout its bytes follow and the identity of each tensor copied there
        self._held: list[tuple[Layout, list[tuple[int, int] | None]] | None] = [None, None]
        self._meta: list[tuple[int, Layout] | None] = [None, None]
        self._snapshots: dict[int, Snapshot] = {}
        self._pinned: set[int] = set()
        self._holding: collections.Counter[int] = collections.Counter()  # `hold` counts
        self._wanted: dict[int, int | None] = {}
        self._lock = threading.Lock()
        self.admissions = Admissions(directory)
        """The newcomers this member's replicator may serve (`replication.admission`)."""

    # ------------------------------------------------------------- trainer side

    def reserve(self, total_bytes: int) -> None:
        """Create both slot files for snapshots of `total_bytes` now, allocated, so that
        their room is taken before training (`replication.space`). NoRoom if the directory
        has none; no slot file is left then."""
        assert self.directory is not None
        try:
            for index in (0, 1):
                self._buffers[index] = _Buffer(total_bytes, slot_file(self.directory, index))
        except NoRoom:
            self._buffers = [None, None]
            for index in (0, 1):
                slot_file(self.directory, index).unlink(missing_ok=True)
            raise

    def want(self, step: int, shards: int | None = None, joiner: str | None = None) -> None:
        """Pin snapshot `step` as soon as it is published (a join will pull it).

        With `shards`, also hash its shards ahead of the manifest request (in a thread);
        with `joiner`, admit it to pull the snapshot (`admissions`).
        """
        if joiner is not None:
            self.admissions.admit(joiner, step)
        with self._lock:
            self._wanted[step] = shards
            held = self._holds(step)
            if held:
                self._pinned.add(step)
        if held and shards:
            self._prehash_aside(step)

    def wanted(self, step: int) -> bool:
        """Whether a join will pull snapshot `step` (`want`)."""
        with self._lock:
            return step in self._wanted

    def release(self, step: int) -> None:
        """The join that pulled `step` is over: its slot may be reused, and its newcomers
        are admitted no longer."""
        self.admissions.forget(step)
        with self._lock:
            self._wanted.pop(step, None)
            self._pinned.discard(step)

    def hold(self, step: int) -> Snapshot | None:
        """Snapshot `step`, its slot kept from reuse until `unhold` (a checkpoint copying it
        out); None if no slot holds it. Holds count, apart from a join's pin."""
        with self._lock:
            if not self._holds(step) or step not in self._snapshots:
                return None
            self._holding[step] += 1
            return self._snapshots[step]

    def unhold(self, step: int) -> None:
        """The end of one `hold` of `step`."""
        with self._lock:
            self._holding[step] -= 1
            if self._holding[step] <= 0:
                del self._holding[step]

    def publish(self, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
        """Copy the current state into a free slot as snapshot `step` (call from a thread)."""
        layout, tensors = layout_of(model, optimizer)
        with self._lock:
            index = self._free_slot()
            if index is None:
                return
            self._meta[index] = None
            buffer, held = self._claim(index, layout)
            self._write_meta(index, None)
        held = copy_into(buffer.view, layout, tensors, held, _always_copied(model, optimizer))
        with self._lock:
            self._held[index] = (layout, held)
            self._meta[index] = (step, layout)
            self._snapshots = {s: v for s, v in self._snapshots.items() if self._holds(s)}
            self._snapshots[step] = Snapshot(step, layout, buffer.view.toreadonly())
            wanted = step in self._wanted
            if wanted:
                self._pinned.add(step)
            self._write_meta(index, (step, layout))
        if wanted and self._wanted.get(step):
            self._prehash_aside(step)  # not on this thread: the trainer settles its publish

    def _claim(
        self, index: int, layout: Layout
    ) -> tuple[_Buffer, list[tuple[int, int] | None] | None]:
        """Slot `index`'s buffer sized for `layout` and what it holds (None: nothing
        reusable); its holdings are cleared until the caller's copy is done (under the lock)."""
        entry = self._held[index]
        held = entry[1] if entry is not None and entry[0] == layout else None
        buffer = self._buffers[index]
        if buffer is None or buffer.size != layout.total_bytes:
            path = None if self.directory is None else slot_file(self.directory, index)
            buffer = self._buffers[index] = _Buffer(layout.total_bytes, path)
            held = None
        self._held[index] = None
        return buffer, held

    def _prehash_aside(self, step: int) -> None:
        """`_prehash(step)` in a thread of its own, so that nothing waits for it."""
        threading.Thread(target=self._prehash, args=(step,), daemon=True).start()

    def _prehash(self, step: int) -> None:
        """Hash the shards of pinned snapshot `step` for the manifest; with a directory,
        also write them beside its slot, where a replicator process takes them instead of
        hashing again at its lower priority (`prehashed`)."""
        snap = self.get(step)
        shards = self._wanted.get(step)
        if snap is None or not shards:
            return
        hashes = snap.shard_hashes(shards)
        with self._lock:
            index = next((i for i in (0, 1) if self._meta[i] and self._meta[i][0] == step), None)
            if index is None or self.directory is None:
                return
            body = {"step": step, "shards": shards, "sha256": hashes}
            _write_json(self.directory / f"slot-{index}.sha256.json", body)

    def prehashed(self, step: int, shards: int) -> list[str] | None:
        """The shard hashes the trainer wrote for snapshot `step` in `shards` shards, if it
        has (a replicator process reading the directory)."""
        if self.directory is None:
            return None
        for index, meta in self._directory_metas():
            if meta["step"] != step:
                continue
            try:
                body = json.loads((self.directory / f"slot-{index}.sha256.json").read_text())
            except (OSError, ValueError):
                return None
            hashes = body.get("sha256") if isinstance(body, dict) else None
            fits = body.get("step") == step and body.get("shards") == shards
            if fits and isinstance(hashes, list) and len(hashes) == shards:
                return [str(h) for h in hashes]
        return None

    def _free_slot(self) -> int | None:
        """The slot to overwrite: not pinned, and not the newest unless the other is pinned."""
        steps = [meta[0] if meta else -1 for meta in self._meta]
        kept = self._pinned | set(self._holding)
        free = [i for i in (0, 1) if steps[i] not in kept or steps[i] < 0]
        if not free:
            return None
        return min(free, key=lambda i: steps[i])

    def _holds(self, step: int) -> bool:
        return any(meta and meta[0] == step for meta in self._meta)

    def _write_meta(self, index: int, meta: tuple[int, Layout] | None) -> None:
        if self.directory is None:
            return
        if meta is None:  # the slot is being rewritten: its hashes no longer hold
            (self.directory / f"slot-{index}.sha256.json").unlink(missing_ok=True)
        body = {"step": meta[0], "layout": meta[1].model_dump()} if meta else {"step": None}
        _write_json(self.directory / f"slot-{index}.json", body)

    # ------------------------------------------------------------- server side

    def get(self, step: int) -> Snapshot | None:
        """Snapshot `step` if a slot holds it."""
        with self._lock:
            if self._is_reader():
                return self._read_from_directory(step)
            return self._snapshots.get(step) if self._holds(step) else None

    def latest_step(self) -> int | None:
        """The newest published step, if any."""
        if self._is_reader():
            steps = [meta["step"] for _, meta in self._directory_metas()]
        else:
            steps = [meta[0] for meta in self._meta if meta]
        return max(steps) if steps else None

    def _is_reader(self) -> bool:
        """True in a separate replicator process: slots are files another process writes."""
        return self.directory is not None and self._buffers == [None, None]

    def _directory_metas(self) -> list[tuple[int, dict]]:
        metas = []
        for index in (0, 1):
            try:
                meta = json.loads((self.directory / f"slot-{index}.json").read_text())
            except (OSError, ValueError):
                continue
            if isinstance(meta.get("step"), int):
                metas.append((index, meta))
        return metas

    def _read_from_directory(self, step: int) -> Snapshot | None:
        """Map the slot file that holds `step`, if any."""
        for index, meta in self._directory_metas():
            if meta["step"] == step:
                layout = Layout.model_validate(meta["layout"])
                array = np.memmap(slot_file(self.directory, index), dtype=np.uint8, mode="r")
                return Snapshot(step, layout, memoryview(array)[: layout.total_bytes])
        return None
