"""Room for the snapshot slots: their size before the first step, and their allocation.

A small /dev/shm itself is in `tests/cluster/test_small_shm.py` (a mount namespace).
"""

from __future__ import annotations

import stat
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from chaos_worker.replication.snapshot import SnapshotStore, layout_of, slot_file
from chaos_worker.replication.space import needed_bytes, projected_layout, room

pytestmark = pytest.mark.unit

OPTIMIZERS: dict[str, Callable] = {
    "sgd": lambda p: torch.optim.SGD(p, lr=0.1),
    "sgd-momentum": lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9),
    "adam": lambda p: torch.optim.Adam(p),
    "adam-fused": lambda p: torch.optim.Adam(p, fused=True),
    "adamw-amsgrad": lambda p: torch.optim.AdamW(p, amsgrad=True),
    "rmsprop-centered": lambda p: torch.optim.RMSprop(p, centered=True, momentum=0.5),
    "adagrad": lambda p: torch.optim.Adagrad(p),
}


def _model() -> torch.nn.Module:
    model = torch.nn.Sequential(torch.nn.Linear(7, 5), torch.nn.Linear(5, 3))
    model[0].register_buffer("table", torch.zeros(11))
    model[1].bias.requires_grad_(False)  # frozen: no optimizer state
    return model


def _state(optimizer: torch.optim.Optimizer) -> dict[int, list[str]]:
    return {id(p): sorted(s) for p, s in optimizer.state.items()}


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_the_projected_layout_is_the_one_after_the_first_step(name: str) -> None:
    model = _model()
    optimizer = OPTIMIZERS[name](model.parameters())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    state = _state(optimizer)  # empty but for Adagrad's, made by its constructor
    projected = projected_layout(model, optimizer)
    assert _state(optimizer) == state
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    model(torch.randn(4, 7)).square().sum().backward()
    optimizer.step()
    real = layout_of(model, optimizer)[0]
    assert projected.slots == real.slots
    assert projected.total_bytes == real.total_bytes


def test_an_optimizer_that_cannot_step_on_meta_tensors_gets_an_adam_sized_estimate() -> None:
    model = _model()
    optimizer = torch.optim.LBFGS(model.parameters())  # its step needs a closure
    trainable = sum(p.numel() * 4 for p in model.parameters() if p.requires_grad)
    now = layout_of(model, optimizer)[0].total_bytes
    assert projected_layout(model, optimizer).total_bytes == now + 2 * trainable


def test_reserved_slots_are_allocated_private_and_kept_by_the_publishes(tmp_path: Path) -> None:
    model = _model()
    optimizer = torch.optim.Adam(model.parameters())
    layout = projected_layout(model, optimizer)
    store = SnapshotStore(tmp_path / "slots")
    store.reserve(layout.total_bytes)
    files = [slot_file(store.directory, i) for i in (0, 1)]
    made = [f.stat() for f in files]
    assert [stat.S_IMODE(s.st_mode) for s in made] == [0o600, 0o600]
    assert all(s.st_size == layout.total_bytes for s in made)
    assert all(s.st_blocks * 512 >= layout.total_bytes for s in made)  # not sparse
    assert needed_bytes(layout) > 2 * layout.total_bytes
    for step in (1, 2):
        model(torch.randn(4, 7)).square().sum().backward()
        optimizer.step()
        store.publish(step, model, optimizer)
    assert [f.stat().st_ino for f in files] == [s.st_ino for s in made]  # not made again
    assert store.get(2) is not None


def test_the_room_of_a_directory_counts_its_slot_files_as_free(tmp_path: Path) -> None:
    store = SnapshotStore(tmp_path / "slots")
    free = room(store.directory)
    store.reserve(32 * 2**20)  # what a restarted pod finds in its snapshot_dir
    assert abs(room(store.directory) - free) < 4 * 2**20
