"""Messages between the pool and its sandbox processes: one JSON object per SOCK_SEQPACKET record.

SEQPACKET keeps record boundaries (no framing code) and carries file descriptors (SCM_RIGHTS) with a
record, which is how the pool hands a forking state the socket of the child it is about to create.
JSON, never pickle: the pool reads what sandboxed code could have written, and unpickling that would run it.
"""

from __future__ import annotations

import json
import socket

MAX_RECORD = 1 << 21  # receive buffer; senders stay far below (results are capped, requests checked)
SEND_BUFFER = 1 << 21  # the kernel caps this at net.core.wmem_max (x2); max_code_bytes stays well under


class ProtocolError(Exception):
    """A record that is not the JSON object the other side should have sent."""


def channel_pair() -> tuple[socket.socket, socket.socket]:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    for s in (a, b):
        s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SEND_BUFFER)
    return a, b


def encode(obj: dict) -> bytes:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode("utf-8", "surrogatepass")


def decode(data: bytes) -> dict:
    try:
        obj = json.loads(data.decode("utf-8", "surrogatepass"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ProtocolError(f"undecodable record of {len(data)} bytes: {exc}") from exc
    if not isinstance(obj, dict):
        raise ProtocolError(f"record is a {type(obj).__name__}, expected a JSON object")
    return obj


def send(sock: socket.socket, obj: dict, fds: tuple[int, ...] = ()) -> None:
    data = encode(obj)
    if fds:
        socket.send_fds(sock, [data], list(fds))
    else:
        sock.sendall(data)


def recv(sock: socket.socket) -> dict | None:
    """The next record, or None at end of stream (the peer closed or died)."""
    data = sock.recv(MAX_RECORD)
    return decode(data) if data else None


def recv_with_fds(sock: socket.socket, maxfds: int = 1) -> tuple[dict | None, list[int]]:
    data, fds, _flags, _addr = socket.recv_fds(sock, MAX_RECORD, maxfds)
    return (decode(data) if data else None), fds
