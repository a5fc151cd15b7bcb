"""Counters of messages and bytes, per link and in total."""

from __future__ import annotations

from dataclasses import dataclass, field

from ._abc import Delivery


@dataclass(frozen=True)
class LinkStats:
    """The counters of one link (one inlet connected to one outlet)."""

    #: The other end of the link, as a printable address.
    peer: str
    delivery: Delivery
    capacity: int
    messages_sent: int = 0
    bytes_sent: int = 0
    messages_received: int = 0
    bytes_received: int = 0
    messages_dropped: int = 0
    #: The link's bound in bytes, if it has one.
    max_bytes: int | None = None
    #: The label the inlet gave itself when it connected ("" for none).
    label: str = ""


@dataclass(frozen=True)
class Stats:
    """Totals over an endpoint's links, and the links themselves (closed ones included)."""

    messages_sent: int = 0
    bytes_sent: int = 0
    messages_received: int = 0
    bytes_received: int = 0
    messages_dropped: int = 0
    links: tuple[LinkStats, ...] = field(default_factory=tuple)


@dataclass
class _Counters:
    """The mutable counters behind a :class:`LinkStats` snapshot."""

    peer: str
    delivery: Delivery
    capacity: int
    max_bytes: int | None = None
    messages_sent: int = 0
    bytes_sent: int = 0
    messages_received: int = 0
    bytes_received: int = 0
    messages_dropped: int = 0
    label: str = ""

    def snapshot(self) -> LinkStats:
        return LinkStats(
            self.peer,
            self.delivery,
            self.capacity,
            self.messages_sent,
            self.bytes_sent,
            self.messages_received,
            self.bytes_received,
            self.messages_dropped,
            self.max_bytes,
            self.label,
        )


def _outlet_stats(messages_sent: int, bytes_sent: int, links: list[_Counters]) -> Stats:
    snapshots = tuple(c.snapshot() for c in links)
    return Stats(
        messages_sent=messages_sent,
        bytes_sent=bytes_sent,
        messages_dropped=sum(s.messages_dropped for s in snapshots),
        links=snapshots,
    )


def _inlet_stats(link: _Counters) -> Stats:
    s = link.snapshot()
    return Stats(
        messages_received=s.messages_received,
        bytes_received=s.bytes_received,
        messages_dropped=s.messages_dropped,
        links=(s,),
    )
