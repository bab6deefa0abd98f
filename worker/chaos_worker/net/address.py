"""`host:port` addresses of members and replicators, checked wherever the wire carries one
(a joiner's, a plan's, a view's), so that a malformed one is refused at decode instead of
failing the code that connects to it."""

from __future__ import annotations

from typing import Annotated

from pydantic import AfterValidator, Field

MAX_ADDRESS_CHARS = 300
"""A DNS name (253) with a port, and room to spare."""


def parse_address(address: str) -> tuple[str, int]:
    """`host:port` -> (host, port); ValueError unless the host is not empty and the port is
    a number from 0 to 65535."""
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit() or int(port) > 65535:
        raise ValueError(f"address {address!r} is not host:port")
    return host, int(port)


def _checked(address: str) -> str:
    parse_address(address)
    return address


Address = Annotated[str, Field(max_length=MAX_ADDRESS_CHARS), AfterValidator(_checked)]
"""A `host:port` (`parse_address`)."""
