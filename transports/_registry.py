"""Choosing a backend by name or by an address's scheme."""

from __future__ import annotations

from ._abc import (
    DEFAULT_CLOSE_TIMEOUT,
    DEFAULT_MAX_FRAME_SIZE,
    Delivery,
    Inlet,
    Outlet,
    Transport,
)
from ._address import parse_address
from ._memory import MemoryTransport
from ._nng import NngTransport
from ._tcp import TcpTransport

_BACKENDS: dict[str, type[Transport]] = {
    "memory": MemoryTransport,
    "tcp": TcpTransport,
    "nng": NngTransport,
}
_BY_SCHEME = {scheme: cls for cls in _BACKENDS.values() for scheme in cls.schemes}


def get(name: str) -> Transport:
    """The backend called *name*: ``"memory"``, ``"tcp"`` or ``"nng"``.

    Raises:
        ValueError: *name* is not one of them.
    """
    try:
        return _BACKENDS[name]()
    except (KeyError, TypeError):
        known = ", ".join(repr(n) for n in _BACKENDS)
        raise ValueError(f"unknown transport {name!r}; the known ones are {known}") from None


def for_address(address: str) -> Transport:
    """The backend that serves *address*, by its scheme.

    Raises:
        ValueError: the address is malformed or its scheme is unknown.
    """
    return _BY_SCHEME[parse_address(address, tuple(_BY_SCHEME)).scheme]()


async def bind(
    address: str,
    *,
    max_frame_size: int = DEFAULT_MAX_FRAME_SIZE,
    close_timeout: float = DEFAULT_CLOSE_TIMEOUT,
    key: bytes | None = None,
) -> Outlet:
    """:meth:`Transport.bind` on the backend chosen by *address*'s scheme."""
    return await for_address(address).bind(
        address, max_frame_size=max_frame_size, close_timeout=close_timeout, key=key
    )


async def connect(
    address: str,
    *,
    delivery: Delivery = Delivery.RELIABLE,
    capacity: int = 8,
    max_bytes: int | None = None,
    max_frame_size: int = DEFAULT_MAX_FRAME_SIZE,
    label: str = "",
    key: bytes | None = None,
) -> Inlet:
    """:meth:`Transport.connect` on the backend chosen by *address*'s scheme."""
    return await for_address(address).connect(
        address,
        delivery=delivery,
        capacity=capacity,
        max_bytes=max_bytes,
        max_frame_size=max_frame_size,
        label=label,
        key=key,
    )
