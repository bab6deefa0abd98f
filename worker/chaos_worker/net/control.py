"""Worker side of the launcher's control channel: JSON lines both ways over a stream socket.

The address is `unix:PATH` (what `chaos run` uses: a Unix socket reaches the launcher
from any network namespace) or `host:port` (TCP).

Workers report progress and membership events; the launcher sends commands (`leave`,
`link_down`, `link_up`). Without a launcher (`control` unset) reports go nowhere.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Callable

from chaos_worker.net.transport import parse_address

UNIX = "unix:"
OnCommand = Callable[[dict], None]
log = logging.getLogger(__name__)


class ControlLink:
    """Reports to and commands from the launcher."""

    def __init__(self, address: str | None, on_command: OnCommand) -> None:
        self._address = address
        self._on_command = on_command
        self._writer: asyncio.StreamWriter | None = None
        self._reader_task: asyncio.Task | None = None

    async def open(self) -> None:
        if not self._address:
            return
        if self._address.startswith(UNIX):
            path = self._address.removeprefix(UNIX)
            reader, self._writer = await asyncio.open_unix_connection(path)
        else:
            reader, self._writer = await asyncio.open_connection(*parse_address(self._address))
        self._reader_task = asyncio.get_running_loop().create_task(self._read(reader))

    def report(self, record: dict) -> None:
        if self._writer is not None and not self._writer.is_closing():
            self._writer.write(json.dumps(record).encode() + b"\n")

    async def close(self) -> None:
        if self._writer is not None:
            with contextlib.suppress(ConnectionError, OSError):
                await self._writer.drain()
            self._writer.close()
        if self._reader_task is not None:
            self._reader_task.cancel()

    async def _read(self, reader: asyncio.StreamReader) -> None:
        while line := await reader.readline():
            try:
                command = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(command, dict):
                try:
                    self._on_command(command)
                except Exception:
                    log.exception("command %s failed", command)
