"""The control protocol between Manager and Workers: JSON messages, versioned, checked.

Every message is a JSON object ``{"v": VERSION, "type": ..., ...fields}``.
:func:`parse` checks a message against the fields its type requires and
raises :class:`ProtocolError` saying what is wrong; the receiver answers an
``error`` message and keeps the connection.

=============  ===============  ==============================================
type           direction        fields
=============  ===============  ==============================================
``hello``      worker->manager  ``name``, ``worker_id``, ``nonce`` (str)
``challenge``  manager->worker  ``nonce`` (str), ``proof`` (str|None)
``auth``       worker->manager  ``proof`` (str|None)
``welcome``    manager->worker  ``worker_id``
``clock``      worker->manager  ``t0`` (the Worker's clock, ns)
``clock_ack``  manager->worker  ``t0``, ``t1``, ``t2`` (the Manager's clock, ns)
``error``      either           ``error`` (str), ``re`` (the type it answers)
``request``    manager->worker  ``id`` (int), ``command`` (str), ``args`` (object)
``reply``      worker->manager  ``id``, ``ok`` (bool), ``result`` (object),
                                ``error`` (str|None), ``traceback`` (str|None),
                                ``node`` (the failing node's name, str|None)
``node_state`` worker->manager  ``node_id``, ``state``, ``reason`` (str|None)
=============  ===============  ==============================================

A ``request``'s ``command`` is one of :data:`COMMANDS`; its ``reply`` carries
the same ``id``.

Checking in, each side proves it knows the cluster's token (if it has one)
without sending it: ``hello`` carries the Worker's nonce; ``challenge``, the
Manager's nonce and its :func:`proof` over both; ``auth``, the Worker's proof.
A Worker with a token thus runs nothing for a Manager that cannot prove it
knows the token, and neither side's proof is of use for another connection.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import json
import os
import re
import secrets
from typing import Any

import httpx

__all__ = [
    "COMMANDS",
    "SILENCE_TIMEOUT",
    "VERSION",
    "ProtocolError",
    "check_answer",
    "checked_host",
    "in_url",
    "make",
    "new_nonce",
    "parse",
    "proof",
    "proves",
    "same_secret",
]

#: The protocol version this side speaks.
VERSION = 2

_OPTIONAL_STR = (str, type(None))

#: For each message type, its fields and the types they may have.
_FIELDS: dict[str, dict[str, type | tuple[type, ...]]] = {
    "hello": {"name": str, "worker_id": str, "nonce": str},
    "challenge": {"nonce": str, "proof": _OPTIONAL_STR},
    "auth": {"proof": _OPTIONAL_STR},
    "welcome": {"worker_id": str},
    "clock": {"t0": int},
    "clock_ack": {"t0": int, "t1": int, "t2": int},
    "error": {"error": str, "re": _OPTIONAL_STR},
    "request": {"id": int, "command": str, "args": dict},
    "reply": {
        "id": int,
        "ok": bool,
        "result": object,
        "error": _OPTIONAL_STR,
        "traceback": _OPTIONAL_STR,
        "node": _OPTIONAL_STR,
    },
    "node_state": {"node_id": str, "state": str, "reason": _OPTIONAL_STR},
    "node_stats": {"stats": dict},
    "log": {"node": str, "level": int, "logger": str, "text": str, "time_ns": int},
}

#: What a Manager may ask a Worker to do (see :class:`chimera._worker.AsyncWorker`).
COMMANDS = frozenset(
    {
        "load_packages",
        "create_nodes",
        "connect_nodes",
        "prep_nodes",
        "start_nodes",
        "record_nodes",
        "step_nodes",
        "stop_nodes",
        "forget_nodes",
        "gather_nodes",
        "collect_nodes",
        "shutdown_nodes",
        "leave",
    }
)

#: Seconds without a message after which either side takes the other as gone
#: (a frozen process, a machine asleep, a network cut: nothing closes the
#: connection). The Worker's clock exchange, every second, keeps both talking.
SILENCE_TIMEOUT = 15.0
#: Why the Manager refuses a Worker that did not prove it knows the token.
TOKEN_REFUSED = "wrong or missing token"


def token_or_default(token: str | None) -> str | None:
    """The token a Manager or Worker uses: *token*, else the ``CHIMERA_TOKEN``
    environment variable; an empty one is none."""
    if token is None:
        token = os.environ.get("CHIMERA_TOKEN")
    return token or None


def checked_host(text: str) -> str:
    """*text* as a host to listen on or reach: a host name, an IPv4 address, or
    an IPv6 address, this one with or without brackets; returned without them.

    Raises:
        ValueError: *text* is none of these (empty, a URL, ``HOST:PORT``,
            unbalanced brackets, ...), naming it.
    """
    host = _host(text)
    if host is not None:
        return host
    head, _, port = text.rpartition(":")
    if not text:
        hint = " (every interface is '0.0.0.0', or '::')"
    elif "/" in text:
        hint = " (a host, not a URL)"
    elif port.isdecimal() and _host(head) is not None:
        hint = " (without its port: the port is given on its own)"
    elif text.startswith("[") and text.endswith("]") and _host(text[1:-1]) is not None:
        hint = " (only an IPv6 address goes in brackets)"
    else:
        hint = ""
    raise ValueError(f"not a host name or IP address: {text!r}{hint}")


def _host(text: str) -> str | None:
    """*text* without brackets if it is a host (see :func:`checked_host`), else None."""
    if text.startswith("[") and text.endswith("]"):
        try:
            ipaddress.IPv6Address(text[1:-1])
        except ValueError:
            return None
        return text[1:-1]
    if ":" in text:
        try:
            ipaddress.IPv6Address(text)  # (a scope too: fe80::1%eth0)
        except ValueError:
            return None
        return text
    return text if _HOST_NAME.fullmatch(text) else None


#: A host name or an IPv4 address: labels of letters (any script's: an
#: internationalised name is encoded when it is looked up), digits, ``-`` and ``_``.
_HOST_NAME = re.compile(r"[\w-]+(\.[\w-]+)*\.?")


def in_url(host: str) -> str:
    """*host* as a URL takes it (the Manager's, a Worker's): an IPv6 address in brackets."""
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


def new_nonce() -> str:
    """A nonce for the check-in: 128 random bits, in hex."""
    return secrets.token_hex(16)


def proof(token: str, role: str, own_nonce: str, other_nonce: str) -> str:
    """The proof that the *role* side (``"manager"`` or ``"worker"``) knows
    *token*, for the check-in where it sent *own_nonce* and got *other_nonce*."""
    text = f"chimera {role} {own_nonce} {other_nonce}".encode()
    return hmac.new(token.encode(), text, hashlib.sha256).hexdigest()


def proves(given: str | None, token: str, role: str, own_nonce: str, other_nonce: str) -> bool:
    """Whether *given* is :func:`proof` of *token*."""
    return same_secret(given, proof(token, role, own_nonce, other_nonce))


def same_secret(given: str | None, secret: str) -> bool:
    """Whether *given* is *secret* (in a time that does not tell how much of it is)."""
    return given is not None and hmac.compare_digest(given.encode(), secret.encode())


#: The longest message accepted, in characters.
MAX_MESSAGE = 16 * 1024 * 1024


class ProtocolError(ValueError):
    """A control message that is not valid JSON of this protocol."""


def check_answer(response: httpx.Response) -> None:
    """Return if *response*, the Manager's answer over HTTP, is a success.

    Raises:
        httpx.HTTPStatusError: it is not; its message says what the Manager
            said (its answer's ``"error"``), as ``raise_for_status`` does not.
    """
    if response.is_success:
        return
    try:
        said = response.json().get("error")
    except (ValueError, AttributeError):  # (not JSON, or not an object)
        said = None
    request = response.request
    text = f"the manager answered {response.status_code} to {request.method} {request.url.path}"
    raise httpx.HTTPStatusError(
        f"{text}: {said}" if said else text, request=request, response=response
    )


def make(type_: str, **fields: Any) -> str:
    """The JSON text of a message of *type_* with *fields*.

    Raises:
        ProtocolError: *type_* is unknown or *fields* do not fit it (a bug on
            this side: the check is the same as :func:`parse`'s).
    """
    message = {"v": VERSION, "type": type_, **fields}
    _check(message)
    return json.dumps(message, separators=(",", ":"))


def parse(text: str | bytes) -> dict[str, Any]:
    """The message in *text*, checked.

    Raises:
        ProtocolError: *text* is too long, not JSON, not an object, of another
            version, of an unknown type, or lacks a field or has one of the
            wrong type.
    """
    if len(text) > MAX_MESSAGE:
        raise ProtocolError(f"message of {len(text)} characters (at most {MAX_MESSAGE})")
    try:
        message = json.loads(text)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ProtocolError(f"not JSON: {exc}") from None
    except RecursionError:
        raise ProtocolError("JSON nested too deep") from None
    _check(message)
    return message


def _check(message: Any) -> None:
    if not isinstance(message, dict):
        raise ProtocolError(f"a message is a JSON object, not {type(message).__name__}")
    version = message.get("v")
    if version != VERSION:
        raise ProtocolError(f"protocol version {version!r}, this side speaks {VERSION}")
    type_ = message.get("type")
    fields = _FIELDS.get(type_) if isinstance(type_, str) else None
    if fields is None:
        raise ProtocolError(f"unknown message type {type_!r}")
    if type_ == "request" and message.get("command") not in COMMANDS:
        raise ProtocolError(f"unknown command {message.get('command')!r}")
    for name, kinds in fields.items():
        if name not in message:
            raise ProtocolError(f"{type_} message without {name!r}")
        value = message[name]
        if not isinstance(value, kinds) or (kinds is int and isinstance(value, bool)):
            raise ProtocolError(f"{type_} message with {name!r} of type {type(value).__name__}")
