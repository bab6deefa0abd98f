"""Room for the snapshot slots, found and taken before training.

A member keeps two slots of its whole training state as files in its snapshot directory
(`snapshot.SnapshotStore`). A write to a mapped file that its tmpfs has no page for kills
the writer with SIGBUS, and /dev/shm is often small (64 MB in a Docker container), so a
worker sizes its slots before it trains and allocates them then (`open_store`):

- The size: most optimizers make their state at their first step, so a copy of the
  optimizer steps once over meta tensors (no memory, the real state untouched) and the
  layout of the model with that state is the slots' (`projected_layout`).
- A private directory in /dev/shm without room for both slots and their metadata is
  replaced by one in the temporary directory (`TMPDIR`; on disk as a rule), as private
  (`private.PrivateDirectory`), with one warning naming both sizes.
- A configured `snapshot_dir` without room, or no place with room, stops the worker with
  one error line (`NoRoom`).

Room is looked at (`statvfs`), then taken by allocating the files (`SnapshotStore.reserve`):
of two workers that share a tmpfs with room for one, the second's allocation fails and it
goes elsewhere too. A slot made later (a layout that changed) is allocated when created as
well, so a tmpfs filled since fails it with `NoRoom`, never with SIGBUS.
"""

from __future__ import annotations

import collections
import contextlib
import copy
import logging
import os
import tempfile
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

from chaos_worker.config import WorkerConfig
from chaos_worker.replication.private import NoRoom, PrivateDirectory, mib
from chaos_worker.replication.snapshot import Layout, SnapshotStore, layout_of, slot_file

if TYPE_CHECKING:
    import torch

    from chaos_worker.replication.sidecar import EarlyReplicator
    from chaos_worker.training.trainspec import TrainSpec

PAGE = 4096
SMALL_FILES = 256 << 10
"""Room for the small files beside the slots: ledgers, admissions, shard hashes, the lock."""

log = logging.getLogger(__name__)


def open_store(
    config: WorkerConfig, spec: TrainSpec, early: EarlyReplicator | None
) -> tuple[SnapshotStore, PrivateDirectory | None]:
    """The member's snapshot store with its slots allocated, and the private directory it
    owns (None: a configured directory, or slots in memory with `replicator: inline`).
    `early`'s directory is used first; moving elsewhere restarts its replicator process.
    NoRoom if no place has room (see the module docstring)."""
    inline = config.replicator == "inline" and not config.replicator_address
    if not config.snapshot_dir and inline:
        return SnapshotStore(None), None
    layout = projected_layout(spec.model, spec.optimizer)
    need = needed_bytes(layout)
    if config.snapshot_dir:
        configured = Path(config.snapshot_dir)
        store = _reserved(configured, layout.total_bytes, need)
        if store is None:
            raise NoRoom(f"{_shortage(need, [configured])}: give snapshot_dir more room")
        return store, None
    owned = early.directory if early is not None else PrivateDirectory.create(config.id)
    store = _reserved(owned.path, layout.total_bytes, need)
    if store is not None:
        return store, owned
    try:
        store, other = _in_tmp(config.id, layout.total_bytes, need, owned.path.parent)
    except NoRoom:
        if early is None:  # else the worker's exit stops its replicator and removes it
            owned.remove()
        raise
    if early is not None:
        early.move(other, config)
    else:
        owned.remove()
    return store, other


def _in_tmp(
    me: str, total_bytes: int, need: int, first: Path
) -> tuple[SnapshotStore, PrivateDirectory]:
    """A store with both slots allocated in a private directory in the temporary
    directory, since `first` had no room (logged); NoRoom if that has none either."""
    base = Path(tempfile.gettempdir())
    elsewhere = os.stat(base).st_dev != os.stat(first).st_dev
    if elsewhere:
        other = PrivateDirectory.create(me, base=base)
        store = _reserved(other.path, total_bytes, need)
        if store is not None:
            log.warning(
                "%s has %s free, the snapshot slots need %s: they are in %s instead",
                first,
                mib(room(first)),
                mib(need),
                other.path,
            )
            return store, other
        other.remove()
    places = [first, base] if elsewhere else [first]
    hint = f"give {first} more room (docker run --shm-size) or set TMPDIR to a disk with room"
    raise NoRoom(f"{_shortage(need, places)}: {hint}")


def projected_layout(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> Layout:
    """The snapshot layout once the optimizer has stepped (see the module docstring). For
    an optimizer that cannot step so (one that needs a closure), an estimate: the state it
    has now plus two tensors per trainable parameter, as Adam keeps."""
    try:
        return layout_of(model, _stepped_on_meta(optimizer))[0]
    except Exception as exc:  # any optimizer's step may refuse meta tensors
        log.debug("sizing the optimizer state by a step on meta tensors failed: %s", exc)
    layout = layout_of(model, optimizer)[0]
    trainable = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    return layout.model_copy(update={"total_bytes": layout.total_bytes + 2 * trainable})


def _stepped_on_meta(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """A shallow copy of `optimizer` over meta copies of its parameters (zero gradients),
    stepped once: its state has the shapes and dtypes the real one will have."""
    import torch

    metas: dict[torch.Tensor, torch.nn.Parameter] = {}
    for group in optimizer.param_groups:
        for param in group["params"]:
            if param not in metas:
                meta = torch.nn.Parameter(
                    torch.empty_like(param, device="meta"), param.requires_grad
                )
                if param.requires_grad:
                    meta.grad = torch.zeros_like(meta)
                metas[param] = meta
    shadow = copy.copy(optimizer)
    device_kernels = ("foreach", "fused", "capturable")  # the plain loop runs on meta
    shadow.param_groups = [
        {
            **group,
            **{key: False for key in device_kernels if key in group},
            "params": [metas[p] for p in group["params"]],
        }
        for group in optimizer.param_groups
    ]
    shadow.state = collections.defaultdict(dict)
    for param, state in optimizer.state.items():
        shadow.state[metas[param]] = {key: _meta(value) for key, value in state.items()}
    shadow._optimizer_step_pre_hooks = collections.OrderedDict()
    shadow._optimizer_step_post_hooks = collections.OrderedDict()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        shadow.step()
    return shadow


def _meta(value: object) -> object:
    """A state entry for the shadow optimizer: tensors on meta, except scalars (a step
    count, which an optimizer may read)."""
    import torch

    if isinstance(value, torch.Tensor) and value.dim():
        return torch.empty_like(value, device="meta")
    return value.clone() if isinstance(value, torch.Tensor) else value


def needed_bytes(layout: Layout) -> int:
    """Room two slots of `layout` take with their files beside them, in whole pages."""
    meta = _pages(2 * len(layout.model_dump_json()))  # slot-N.json, as json.dumps spaces it
    # every slot-N.json is written beside the one it replaces (write_atomically)
    return 2 * _pages(max(layout.total_bytes, 1)) + 4 * meta + SMALL_FILES


def room(directory: Path) -> int:
    """Bytes this process may still take in `directory`'s filesystem, counting the slot
    files already there (a restarted pod's: `reserve` replaces them)."""
    info = os.statvfs(directory)
    free = info.f_bavail * info.f_frsize
    for index in (0, 1):
        with contextlib.suppress(OSError):
            free += slot_file(directory, index).stat().st_blocks * 512
    return free


def _reserved(directory: Path, total_bytes: int, need: int) -> SnapshotStore | None:
    """A store in `directory` with both slots allocated, or None if it has no room (looked
    at first: allocating what does not fit would fill up a tmpfs that others use)."""
    store = SnapshotStore(directory)
    if room(directory) < need:
        return None
    try:
        store.reserve(total_bytes)
    except NoRoom:  # taken since the look
        return None
    return store


def _shortage(need: int, places: list[Path]) -> str:
    """`the snapshot slots need N, but A has X and B has Y free`."""
    free = [f"{place} has {mib(room(place))}" for place in places]
    return f"the snapshot slots need {mib(need)}, but {' and '.join(free)} free"


def _pages(size: int) -> int:
    return -(-size // PAGE) * PAGE
