"""A spare pod's order to join: its projected config file, validated before it is obeyed
(`chaos_worker.join.activation`)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
from chaos_worker.config import WorkerConfig
from chaos_worker.join.activation import MAX_BYTES, join_order, read_bounded, watch
from pydantic import ValidationError

pytestmark = pytest.mark.unit

STANDBY = {
    "id": "digits-w3",
    "listen": "127.0.0.1:7079",
    "entry": "chaos_worker.examples.digits:factory",
    "standby": True,
    "standby_file": "/etc/chaos/config.json",
}


def ordered(**changes: object) -> str:
    return json.dumps({**STANDBY, "standby": False, "join": "127.0.0.1:7070", **changes})


def test_a_standby_config_needs_somewhere_its_order_comes_from() -> None:
    WorkerConfig.model_validate(STANDBY)
    with pytest.raises(ValidationError, match=r"members .* or join"):
        WorkerConfig.model_validate({k: v for k, v in STANDBY.items() if k != "standby_file"})


def test_the_same_config_ending_the_standby_orders_the_join() -> None:
    standby = WorkerConfig.model_validate(STANDBY)
    assert join_order(standby, json.dumps(STANDBY)) is None  # still waiting
    assert join_order(standby, ordered()) == "127.0.0.1:7070"


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("{not json", "Invalid JSON"),
        (ordered(id="digits-w9"), "changes id"),
        (ordered(entry="other.module:factory", seed=3), "changes entry, seed"),
        (ordered(members={"digits-w3": "127.0.0.1:7079"}), "changes members"),
        (ordered(join=None), r"members .* or join"),
        (ordered(steps=0), "greater than 0"),
        (json.dumps({**STANDBY, "bogus": 1}), "Extra inputs"),
    ],
)
def test_a_file_that_changes_more_than_the_order_is_refused(text: str, reason: str) -> None:
    with pytest.raises(ValueError, match=reason):
        join_order(WorkerConfig.model_validate(STANDBY), text)


def test_a_file_is_read_only_up_to_its_bound(tmp_path: Path) -> None:
    big = tmp_path / "config.json"
    big.write_text(" " * (MAX_BYTES + 1))
    with pytest.raises(ValueError, match="larger than"):
        read_bounded(str(big))


def test_watch_obeys_the_first_valid_order_once_and_waits_past_refused_ones(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "config.json"
    standby = WorkerConfig.model_validate(STANDBY)
    orders: list[str] = []

    async def scenario() -> None:
        task = asyncio.create_task(watch(str(path), standby, orders.append, poll_s=0.01))
        await asyncio.sleep(0.05)  # no file yet: waits
        path.write_text(json.dumps(STANDBY))
        await asyncio.sleep(0.05)
        path.write_text(ordered(id="intruder"))
        await asyncio.sleep(0.05)
        assert orders == [] and not task.done()
        path.write_text(ordered())
        await asyncio.wait_for(task, 5)

    asyncio.run(scenario())
    assert orders == ["127.0.0.1:7070"]
    refusals = [r for r in caplog.records if "refused" in r.getMessage()]
    assert len(refusals) == 1 and "changes id" in refusals[0].getMessage()
