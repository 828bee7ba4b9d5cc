"""The warm workers' wire format: frames of a 4-byte length, then JSON, on Unix sockets
between the test process, its zygote and each compile's launcher. Only the standard
library."""

from __future__ import annotations

import json
import socket
import struct
from collections.abc import Iterator, Mapping
from typing import Any

_FRAME = struct.Struct("!I")


# -- framing: a 4-byte length, then JSON ---------------------------------------------------------
def frame(data: Mapping[str, Any]) -> bytes:
    body = json.dumps(data, separators=(",", ":")).encode()
    return _FRAME.pack(len(body)) + body


def split(buf: bytearray) -> Iterator[dict[str, Any]]:
    """Take every whole frame off the front of ``buf``."""
    while len(buf) >= _FRAME.size:
        (size,) = _FRAME.unpack_from(buf)
        if len(buf) < _FRAME.size + size:
            return
        body = bytes(buf[_FRAME.size:_FRAME.size + size])
        del buf[:_FRAME.size + size]
        yield json.loads(body)


def recv_frame(sock: socket.socket, buf: bytearray | None = None) -> dict[str, Any] | None:
    """One frame, blocking; None at EOF. ``buf`` keeps what was read beyond it."""
    buf = bytearray() if buf is None else buf
    while True:
        for frame in split(buf):
            return frame
        data = sock.recv(1 << 16)
        if not data:
            return None
        buf += data
