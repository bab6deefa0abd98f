"""Snapshots: flat layout round trips, shards, double buffering and pinning."""

from __future__ import annotations

import hashlib
import itertools

import pytest
import torch
from chaos_worker.replication.snapshot import (
    Layout,
    SnapshotStore,
    checked_layout,
    copied_by_load,
    copy_into,
    layout_fault,
    layout_of,
    load_from,
    shard_bounds,
    state_digest,
)
from hypothesis import given
from hypothesis import strategies as st

pytestmark = pytest.mark.unit


def _job(optimizer: str, seed: int = 0, steps: int = 2):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.ReLU(), torch.nn.Linear(5, 3))
    if optimizer == "adam":
        opt = torch.optim.Adam(model.parameters(), lr=0.01)
    else:
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for _ in range(steps):
        opt.zero_grad()
        model(torch.randn(4, 6)).square().sum().backward()
        opt.step()
    return model, opt


@pytest.mark.parametrize("optimizer", ["adam", "sgd"])
def test_a_fresh_job_loaded_from_a_snapshot_has_the_same_state(optimizer: str) -> None:
    model, opt = _job(optimizer)
    store = SnapshotStore()
    store.publish(7, model, opt)
    snap = store.get(7)
    fresh_model, fresh_opt = _job(optimizer, seed=1, steps=0)
    assert state_digest(fresh_model, fresh_opt) != state_digest(model, opt)
    load_from(bytes(snap.data), snap.layout, fresh_model, fresh_opt, torch.device("cpu"))
    assert state_digest(fresh_model, fresh_opt) == state_digest(model, opt)
    # and both go on identically
    for m, o in ((model, opt), (fresh_model, fresh_opt)):
        o.zero_grad()
        m(torch.ones(2, 6)).sum().backward()
        o.step()
    assert state_digest(fresh_model, fresh_opt) == state_digest(model, opt)


@given(st.integers(1, 10_000), st.integers(1, 64))
def test_shards_tile_the_buffer(total: int, shards: int) -> None:
    bounds = [shard_bounds(total, shards, i) for i in range(shards)]
    assert bounds[0][0] == 0 and bounds[-1][1] == total
    assert all(a[1] == b[0] for a, b in itertools.pairwise(bounds))
    sizes = {end - start for start, end in bounds}
    assert max(sizes) - min(sizes) <= 1


def test_two_slots_alternate_and_a_pinned_snapshot_survives() -> None:
    model, opt = _job("adam")
    store = SnapshotStore()
    store.publish(1, model, opt)
    store.publish(2, model, opt)
    assert store.get(1) is not None and store.get(2) is not None
    store.publish(3, model, opt)
    assert store.get(1) is None  # the older slot was reused
    store.want(3, shards=4)
    for step in (4, 5, 6):
        store.publish(step, model, opt)
    assert store.get(3) is not None and store.get(6) is not None
    hashes = store.get(3).shard_hashes(4)
    assert len(hashes) == 4 and len(set(hashes)) == 4
    store.release(3)
    store.publish(7, model, opt)
    assert store.get(3) is None


def test_a_wanted_snapshot_is_pinned_when_it_is_published() -> None:
    model, opt = _job("sgd")
    store = SnapshotStore()
    store.want(2)
    for step in (1, 2, 3, 4, 5):
        store.publish(step, model, opt)
    assert store.get(2) is not None and store.latest_step() == 5


def test_a_directory_store_is_readable_by_another_store(tmp_path) -> None:
    model, opt = _job("adam")
    writer = SnapshotStore(tmp_path)
    writer.publish(9, model, opt)
    reader = SnapshotStore(tmp_path)  # what `chaos replicator --dir` does
    snap = reader.get(9)
    assert snap is not None
    assert bytes(snap.data) == bytes(writer.get(9).data)
    assert layout_of(model, opt)[0] == snap.layout


def test_frozen_tensors_are_copied_once_per_slot_and_trained_ones_every_time() -> None:
    model, opt = _job("sgd")
    frozen = torch.nn.Parameter(torch.arange(12.0), requires_grad=False)
    model.register_parameter("table", frozen)
    store = SnapshotStore()
    for step in (1, 2):
        store.publish(step, model, opt)
    weight = model[0].weight
    # changes that bypass the version counter: seen for a trained tensor, not a frozen one
    frozen.data.view(-1)[0] = -1.0
    weight.data.view(-1)[0] = 123.0
    store.publish(3, model, opt)
    snap = store.get(3)
    data = torch.frombuffer(bytearray(snap.data), dtype=torch.float32)
    slots = {tuple(s.key): s for s in snap.layout.slots}
    assert data[slots["model", "table"].offset // 4] == 0.0  # reused: same version held
    assert data[slots["model", "0.weight"].offset // 4] == 123.0  # always copied
    # a tracked in-place change of the frozen tensor is copied
    with torch.no_grad():
        frozen.add_(1.0)
    store.publish(4, model, opt)
    data = torch.frombuffer(bytearray(store.get(4).data), dtype=torch.float32)
    assert data[slots["model", "table"].offset // 4 + 1] == 2.0


def _with_table(model: torch.nn.Module, start: float) -> torch.nn.Parameter:
    table = torch.nn.Parameter(torch.arange(start, start + 1000.0), requires_grad=False)
    model.register_parameter("table", table)
    return table


def test_loading_adopts_buffers_without_copying_them() -> None:
    """A buffer (a frozen table, running statistics) becomes the snapshot's tensor itself;
    parameters are copied into place, so the optimizer still updates the model's."""
    model, opt = _job("sgd")
    model.register_buffer("table", torch.arange(64.0))
    store = SnapshotStore()
    store.publish(3, model, opt)
    snap = store.get(3)
    fresh, fresh_opt = _job("sgd", seed=1, steps=0)
    fresh.register_buffer("table", torch.zeros(64))
    weight = fresh[0].weight
    data = bytearray(snap.data)
    load_from(data, snap.layout, fresh, fresh_opt, torch.device("cpu"))
    assert state_digest(fresh, fresh_opt) == state_digest(model, opt)
    slot = next(s for s in snap.layout.slots if list(s.key) == ["model", "table"])
    base = torch.frombuffer(data, dtype=torch.uint8).data_ptr()
    assert fresh.table.data_ptr() == base + slot.offset  # the pulled bytes, not a copy
    assert fresh[0].weight is weight and fresh_opt.param_groups[0]["params"][0] is weight


def test_a_replicator_process_takes_the_trainers_hashes_of_a_pinned_snapshot(tmp_path) -> None:
    """The trainer hashes a snapshot pinned for a join and writes the hashes beside its
    slot; a store reading the directory (the replicator process) finds them for that step
    and shard count only, and they go when the slot is rewritten."""
    model, opt = _job("sgd")
    trainer = SnapshotStore(tmp_path)
    trainer.publish(4, model, opt)
    reader = SnapshotStore(tmp_path)
    assert reader.prehashed(4, 3) is None  # not pinned for a join: nobody hashed it
    trainer.want(4, 3)
    trainer._prehash(4)  # what want() starts in a thread
    assert reader.prehashed(4, 3) == reader.get(4).shard_hashes(3)
    assert reader.prehashed(4, 2) is None and reader.prehashed(5, 3) is None
    trainer.release(4)
    for step in (5, 6):  # both slots rewritten
        trainer.publish(step, model, opt)
    assert reader.prehashed(4, 3) is None
    assert not list(tmp_path.glob("*.sha256.json"))


def test_what_loading_copies_is_the_parameters_on_a_cpu() -> None:
    model, _ = _job("sgd")
    model.register_buffer("table", torch.zeros(1000))
    params = sum(p.numel() * 4 for p in model.parameters())
    assert copied_by_load(model, 10**6, torch.device("cpu")) == params
    assert copied_by_load(model, 100, torch.device("cpu")) == 100  # never more than the state
    assert copied_by_load(model, 10**6, torch.device("cuda")) == 10**6  # all of it, over PCIe


def test_a_read_only_payload_loads_into_bytes_of_the_states_own() -> None:
    """A received payload is read-only: the optimizer's moments, which keep views of the
    loaded bytes, get a copy, so the next step writes there and not into the payload."""
    model, opt = _job("adam")
    store = SnapshotStore()
    store.publish(5, model, opt)
    snap = store.get(5)
    payload = memoryview(bytes(snap.data))
    fresh, fresh_opt = _job("adam", seed=1, steps=0)
    load_from(payload, snap.layout, fresh, fresh_opt, torch.device("cpu"))
    assert state_digest(fresh, fresh_opt) == state_digest(model, opt)
    before = bytes(payload)
    for m, o in ((model, opt), (fresh, fresh_opt)):
        o.zero_grad()
        m(torch.ones(2, 6)).sum().backward()
        o.step()
    assert state_digest(fresh, fresh_opt) == state_digest(model, opt)
    assert bytes(payload) == before


def test_the_digest_is_the_flat_buffers_with_its_padding() -> None:
    """`state_digest` hashes the tensors where they lie; it equals the digest of the flat
    buffer (zero padding between slots included) followed by the layout."""
    model, opt = _job("adam")
    layout, tensors = layout_of(model, opt)
    assert any(s.nbytes % 64 for s in layout.slots)  # there is padding to hash
    flat = bytearray(layout.total_bytes)
    copy_into(memoryview(flat), layout, tensors)
    expected = hashlib.sha256(flat + layout.model_dump_json().encode()).hexdigest()
    assert state_digest(model, opt) == expected


def _forged(layout: Layout, index: int, **changes) -> Layout:
    slots = list(layout.slots)
    slots[index] = slots[index].model_copy(update=changes)
    return layout.model_copy(update={"slots": slots})


def test_a_layout_a_load_cannot_read_is_refused_before_loading() -> None:
    """A state's layout comes from another member: every slot must lie in the payload,
    hold its shape's bytes, name a dtype and a model or optimizer entry."""
    model, opt = _job("adam")
    layout, _ = layout_of(model, opt)
    size = layout.total_bytes
    assert layout_fault(layout, size) is None
    last = len(layout.slots) - 1
    end = layout.slots[last].offset
    forged = {
        "size": (layout, size - 64),
        "past the end": (_forged(layout, last, offset=end + 64), size),
        "bytes for shape": (_forged(layout, 0, nbytes=layout.slots[0].nbytes * 2), size),
        "no dtype": (_forged(layout, 0, dtype="Tensor"), size),
        "negative shape": (_forged(layout, 0, shape=[-5, -6]), size),
        "not a model": (_forged(layout, 0, key=["sampler", "seed"]), size),
        "negative offset": (_forged(layout, 0, offset=-64), size),
    }
    for name, (bad, claimed) in forged.items():
        assert layout_fault(bad, claimed) is not None, name


def test_another_members_layout_is_checked_before_it_is_used() -> None:
    """`checked_layout`, as the newcomer and the puller read a layout off the wire."""
    model, opt = _job("adam")
    layout, _ = layout_of(model, opt)
    raw = layout.model_dump()
    assert checked_layout(raw) == layout
    assert checked_layout(raw, layout.total_bytes) == layout
    with pytest.raises(ValueError, match="not a layout"):
        checked_layout({"slots": "many"})
    with pytest.raises(ValueError, match="bytes, not"):
        checked_layout(raw, layout.total_bytes + 64)  # a payload of another size
    with pytest.raises(ValueError, match="past"):
        checked_layout(_forged(layout, 0, offset=layout.total_bytes).model_dump())
