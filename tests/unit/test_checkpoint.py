"""Checkpoints: format round trip, verification of every byte, newest sound one, keep-K,
and the writer thread copying a snapshot out of its slot."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from chaos_worker.replication.checkpoint import (
    MANIFEST,
    STATE,
    CheckpointError,
    complete,
    load_checkpoint,
    model_weights,
    newest,
    read_manifest,
    resolve,
    verify,
    write_checkpoint,
)
from chaos_worker.replication.checkpointer import Checkpointer
from chaos_worker.replication.snapshot import SnapshotStore, state_digest

pytestmark = pytest.mark.unit

LIMIT = 1 << 30
CPU = torch.device("cpu")


def _job(seed: int = 0, steps: int = 2):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(
        torch.nn.Linear(6, 5), torch.nn.BatchNorm1d(5), torch.nn.Linear(5, 3)
    ).double()
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    for _ in range(steps):
        opt.zero_grad()
        model(torch.randn(4, 6, dtype=torch.float64)).square().sum().backward()
        opt.step()
    return model, opt


def _write(root: Path, step: int, seed: int = 0, keep: int = 3) -> tuple[Path, str]:
    model, opt = _job(seed)
    store = SnapshotStore()
    store.publish(step, model, opt)
    snap = store.get(step)
    path = write_checkpoint(root, step, snap.layout, snap.data, dtype="float64", keep=keep)
    return path, state_digest(model, opt)


def test_a_checkpoint_loads_back_into_the_same_state(tmp_path: Path) -> None:
    path, digest = _write(tmp_path, 20)
    assert path.name == "step-00000020"
    assert sorted(p.name for p in path.iterdir()) == [MANIFEST, STATE]
    model, opt = _job(seed=1, steps=0)
    manifest = load_checkpoint(path, model, opt, CPU, LIMIT)
    assert manifest.step == 20 and not manifest.final and manifest.dtype == "float64"
    assert state_digest(model, opt) == digest


def test_model_weights_are_what_load_state_dict_takes(tmp_path: Path) -> None:
    path, _ = _write(tmp_path, 5)
    trained, _ = _job()
    fresh, _ = _job(seed=3, steps=0)
    fresh.load_state_dict(model_weights(path, LIMIT))  # strict: every key, nothing more
    for key, value in trained.state_dict().items():
        assert torch.equal(fresh.state_dict()[key], value), key


def _flip(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:-10])


@pytest.mark.parametrize(
    ("damage", "why"),
    [
        (lambda p: _truncate(p / STATE), "bytes, the manifest says"),
        (lambda p: _flip(p / STATE), "SHA-256 differs"),
        (lambda p: (p / MANIFEST).unlink(), "manifest.json is missing"),
        (lambda p: _truncate(p / MANIFEST), "not JSON"),
        (lambda p: (p / STATE).unlink(), "state.safetensors is missing"),
    ],
)
def test_a_damaged_checkpoint_is_refused_and_the_one_before_used(
    tmp_path: Path, damage, why: str
) -> None:
    older, _ = _write(tmp_path, 10)
    newer, _ = _write(tmp_path, 20, seed=1)
    damage(newer)
    with pytest.raises(CheckpointError, match=why):
        verify(newer, LIMIT)
    skipped = []
    found = newest(tmp_path, LIMIT, lambda p, w: skipped.append((p.name, w)))
    assert found is not None and found[0] == older and found[1].step == 10
    assert len(skipped) == 1 and skipped[0][0] == newer.name and why in skipped[0][1]
    assert resolve(tmp_path, LIMIT, lambda *_: None)[0] == older


def _rewrite_manifest(path: Path, **changes) -> None:
    body = json.loads((path / MANIFEST).read_text())
    body.update(changes)
    (path / MANIFEST).write_text(json.dumps(body))


@pytest.mark.parametrize(
    ("changes", "why"),
    [
        ({"version": 99}, "format version 99"),
        ({"format": "other"}, "not a chaos checkpoint"),
        ({"step": 21}, "the manifest says step 21"),
        ({"files": {}}, "lists []"),
        ({"extra": 1}, "extra"),
    ],
)
def test_a_manifest_that_does_not_fit_is_refused(tmp_path: Path, changes, why: str) -> None:
    path, _ = _write(tmp_path, 20)
    _rewrite_manifest(path, **changes)
    with pytest.raises(CheckpointError, match=why.replace("[", r"\[").replace("]", r"\]")):
        verify(path, LIMIT)


def test_sizes_are_bounded_before_reading(tmp_path: Path) -> None:
    path, _ = _write(tmp_path, 20)
    with pytest.raises(CheckpointError, match="over the limit"):
        verify(path, 100)
    body = json.loads((path / MANIFEST).read_text())
    body["files"][STATE]["bytes"] -= 5  # a file larger than it should be is not read whole
    (path / MANIFEST).write_text(json.dumps(body))
    with pytest.raises(CheckpointError, match="over"):
        verify(path, LIMIT)


def test_keep_the_newest_and_ignore_partial_writes(tmp_path: Path) -> None:
    for step in (10, 20, 30, 40):
        _write(tmp_path, step, keep=2)
    assert [s for s, _ in complete(tmp_path)] == [30, 40]
    partial = tmp_path / ".tmp-step-00000050-1-1"
    partial.mkdir()
    (partial / STATE).write_bytes(b"half")
    assert newest(tmp_path, LIMIT)[1].step == 40


def test_errors_name_what_is_wrong(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="does not exist"):
        resolve(tmp_path / "nope", LIMIT)
    with pytest.raises(CheckpointError, match="holds no checkpoint"):
        resolve(tmp_path, LIMIT)
    (tmp_path / "file").write_text("x")
    with pytest.raises(CheckpointError, match="not a directory"):
        resolve(tmp_path / "file", LIMIT)
    with pytest.raises(CheckpointError, match="is missing"):
        read_manifest(tmp_path)


def test_a_checkpoint_for_another_model_is_refused(tmp_path: Path) -> None:
    path, _ = _write(tmp_path, 20)
    other = torch.nn.Linear(3, 3).double()
    with pytest.raises(CheckpointError, match="does not fit"):
        load_checkpoint(path, other, torch.optim.SGD(other.parameters(), lr=0.1), CPU, LIMIT)


def test_the_writer_copies_the_slot_and_writes_in_the_background(tmp_path: Path) -> None:
    model, opt = _job()
    store = SnapshotStore()
    written = []
    ckpt = Checkpointer(
        tmp_path,
        dtype="float64",
        last_step=30,
        every_steps=10,
        every_s=None,
        keep=3,
        on_written=written.append,
    )
    assert [s for s in range(1, 31) if ckpt.due(s, writer=True) and s % 10 == 0] == [10, 20, 30]
    assert not ckpt.due(10, writer=False)
    assert ckpt.claim(10, writer=True)
    assert not ckpt.claim(11, writer=True)  # claimed: the copy is queued
    assert not ckpt.claim(12, writer=True)
    store.publish(10, model, opt)
    digest = state_digest(model, opt)
    ckpt.capture(store, 10)
    assert not ckpt.due(10, writer=True)  # taken
    # the slots are reused at once: the private copy is what gets written
    opt.zero_grad()
    model(torch.ones(2, 6, dtype=torch.float64)).sum().backward()
    opt.step()
    store.publish(11, model, opt)
    store.publish(12, model, opt)
    ckpt.close(timeout_s=60)
    assert [r["step"] for r in written] == [10] and written[0]["write_s"] >= 0
    fresh, fresh_opt = _job(seed=2, steps=0)
    load_checkpoint(tmp_path / "step-00000010", fresh, fresh_opt, CPU, LIMIT)
    assert state_digest(fresh, fresh_opt) == digest


def test_the_streamed_file_is_what_the_safetensors_library_writes(tmp_path: Path) -> None:
    from chaos_worker.replication.checkpoint import encode_state, write_state
    from safetensors.torch import load

    model, opt = _job()
    store = SnapshotStore()
    store.publish(3, model, opt)
    snap = store.get(3)
    entry = write_state(tmp_path / "s.safetensors", snap.layout, snap.data)
    streamed = (tmp_path / "s.safetensors").read_bytes()
    assert entry.bytes == len(streamed)
    ours, theirs = load(streamed), load(encode_state(snap.layout, snap.data))
    assert set(ours) == set(theirs) and any(t.dim() == 0 for t in ours.values())
    for name, tensor in theirs.items():
        assert ours[name].dtype == tensor.dtype and torch.equal(ours[name], tensor), name


def test_when_a_checkpoint_is_due(tmp_path: Path) -> None:
    def policy(**kw) -> Checkpointer:
        return Checkpointer(tmp_path, dtype="float64", last_step=50, keep=3, **kw)

    def captured(ckpt: Checkpointer, steps: range) -> list[int]:
        taken = []
        for step in steps:
            if ckpt.due(step, writer=True):
                ckpt.taken(step)
                taken.append(step)
        return taken

    by_steps = policy(every_steps=20, every_s=None, start_step=20)  # resumed at 20
    assert by_steps.due(45, writer=True)  # past a multiple, not yet taken: still due
    assert captured(by_steps, range(21, 51)) == [40, 50]
    final_only = policy(every_steps=None, every_s=None)
    assert captured(final_only, range(1, 51)) == [50]
    given_back = policy(every_steps=10, every_s=None)
    assert given_back.claim(10, writer=True)
    given_back.capture(SnapshotStore(), 10)  # nothing published: the claim is given back
    assert given_back.claim(11, writer=True)
    by_time = policy(every_steps=None, every_s=1e-9)
    assert by_time.due(1, writer=True) and not by_time.due(1, writer=False)
    for ckpt in (by_steps, final_only, given_back, by_time):
        ckpt.close(timeout_s=10)


def test_a_held_slot_is_not_reused_until_let_go() -> None:
    model, opt = _job()
    store = SnapshotStore()
    store.publish(10, model, opt)
    held = store.hold(10)
    assert held is not None and store.hold(99) is None
    for step in (11, 12, 13):  # publishes go to the other slot meanwhile
        store.publish(step, model, opt)
    assert store.get(10) is held and store.get(13) is not None
    store.unhold(10)
    store.publish(14, model, opt)
    store.publish(15, model, opt)
    assert store.get(10) is None


def _resume(directory: Path, required: bool):
    """`Member._resume` of an initial member given `resume_from: directory`."""
    from types import SimpleNamespace

    from chaos_worker.config import WorkerConfig
    from chaos_worker.member import Member

    config = WorkerConfig(id="w0", entry="m:f", members={"w0": "127.0.0.1:1"}, dtype="float64",
                          resume_from=str(directory), resume_required=required)  # fmt: skip
    model, opt = _job(seed=1, steps=0)
    return Member._resume(config, SimpleNamespace(model=model, optimizer=opt), CPU)


def test_an_optional_resume_starts_afresh_where_nothing_verifies(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="holds no checkpoint"):
        _resume(tmp_path, required=True)
    assert _resume(tmp_path, required=False) == {"step": 0, "path": None, "skipped": []}
    path, _ = _write(tmp_path, 10)
    (path / STATE).write_bytes(b"torn")
    started = _resume(tmp_path, required=False)
    assert started["step"] == 0 and started["skipped"][0].startswith("step-00000010: ")
    _write(tmp_path, 5)
    assert _resume(tmp_path, required=False)["step"] == 5  # the sound one before


def test_the_termination_message_names_the_newest_checkpoint(tmp_path: Path) -> None:
    from chaos_worker.process import write_termination_log

    log = tmp_path / "termination-log"
    write_termination_log(str(log), 49, 50)
    assert json.loads(log.read_text()) == {"step": 49, "checkpoint": 50}
    write_termination_log(str(log), 9)
    assert json.loads(log.read_text()) == {"step": 9}
