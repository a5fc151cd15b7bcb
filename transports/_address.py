"""Parsing and checking addresses and connection arguments."""

from __future__ import annotations

from dataclasses import dataclass

from ._abc import Delivery
from ._framing import MAX_CAPACITY, MAX_KEY, MAX_LABEL, MAX_LINK_BYTES


@dataclass(frozen=True)
class Address:
    """A parsed address. ``host``/``port`` for network schemes, ``path`` otherwise."""

    scheme: str
    host: str = ""
    port: int = 0
    path: str = ""

    def __str__(self) -> str:
        if self.path or self.scheme == "memory":
            return f"{self.scheme}://{self.path}"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}://{host}:{self.port}"


#: Schemes whose address is host:port; the others take a path (or a name).
_NETWORK_SCHEMES = {"tcp", "nng+tcp"}


def parse_address(address: str, schemes: tuple[str, ...] | None = None) -> Address:
    """Split *address* into its parts.

    Raises:
        ValueError: *address* is not a string of the form ``scheme://...``, its
            scheme is not in *schemes*, or its host/port/path is malformed.
    """
    if not isinstance(address, str) or "://" not in address:
        raise ValueError(f"an address looks like 'tcp://127.0.0.1:5555', not {address!r}")
    scheme, rest = address.split("://", 1)
    if schemes is not None and scheme not in schemes:
        known = ", ".join(f"{s}://" for s in schemes)
        one_of = "one of " if len(schemes) > 1 else ""
        raise ValueError(f"address {address!r}: the scheme must be {one_of}{known}")
    if scheme == "memory":
        return Address(scheme, path=rest)
    if scheme not in _NETWORK_SCHEMES:
        if not rest.startswith("/") or "\0" in rest:
            raise ValueError(
                f"address {address!r}: the path must be absolute, e.g. {scheme}:///tmp/x"
            )
        return Address(scheme, path=rest)
    host, sep, port_text = rest.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    digits = port_text.isascii() and port_text.isdigit()  # (not "٣", which int() takes)
    if not sep or not host or not digits or int(port_text) > 65535:
        raise ValueError(f"address {address!r}: expected {scheme}://HOST:PORT (PORT 0 for any)")
    return Address(scheme, host=host, port=int(port_text))


def check_key(key: bytes | None) -> None:
    """Raises ValueError unless *key* is None or 1 to :data:`MAX_KEY` bytes."""
    if key is not None and (not isinstance(key, bytes) or not 1 <= len(key) <= MAX_KEY):
        raise ValueError(f"key must be None or 1 to {MAX_KEY} bytes, not {key!r}")


def check_connect_args(
    delivery: Delivery,
    capacity: int,
    max_bytes: int | None = None,
    label: str = "",
    key: bytes | None = None,
) -> None:
    """Raises ValueError unless *delivery*, *capacity*, *max_bytes*, *label*
    and *key* are valid for a link."""
    check_key(key)
    if not isinstance(delivery, Delivery):
        raise ValueError(f"delivery must be Delivery.RELIABLE or Delivery.LATEST, not {delivery!r}")
    if (
        isinstance(capacity, bool)
        or not isinstance(capacity, int)
        or not (1 <= capacity <= MAX_CAPACITY)
    ):
        raise ValueError(f"capacity must be an integer from 1 to {MAX_CAPACITY}, not {capacity!r}")
    if max_bytes is not None and (
        isinstance(max_bytes, bool)
        or not isinstance(max_bytes, int)
        or not 1 <= max_bytes <= MAX_LINK_BYTES
    ):
        raise ValueError(
            f"max_bytes must be None or an integer from 1 to {MAX_LINK_BYTES}, not {max_bytes!r}"
        )
    if not isinstance(label, str):
        raise ValueError(f"label must be a str, not {type(label).__name__}")
    try:
        size = len(label.encode("utf-8"))
    except UnicodeEncodeError:
        raise ValueError(f"label {label!r} cannot be encoded as UTF-8") from None
    if size > MAX_LABEL:
        raise ValueError(f"label is {size} bytes of UTF-8, over {MAX_LABEL}")
