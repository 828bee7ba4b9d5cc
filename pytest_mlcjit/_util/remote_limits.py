"""How long the remote tier may take, declared once: the option table's defaults and
ranges (:mod:`pytest_mlcjit.engine.settings`) and :class:`RemoteOptions`'s defaults (the
``pytest-mlcjit remote`` commands, plain Python) are these; and :class:`Deadline`, the
total time limit of one remote operation. Only the standard library."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable

#: Seconds to wait for a connection to the remote (``MLC_JIT_REMOTE_CONNECT_TIMEOUT``).
CONNECT_TIMEOUT_S = 5.0
#: Seconds to wait for each read from the remote (``MLC_JIT_REMOTE_READ_TIMEOUT``).
READ_TIMEOUT_S = 60.0
#: The largest timeout accepted: a day (more is a typo, and a socket cannot wait ``1e12``).
MAX_TIMEOUT_S = 86400.0
#: A remote operation's total deadline is ``DEADLINE_S + bytes / MIN_THROUGHPUT``
#: (``MLC_JIT_REMOTE_DEADLINE``, ``MLC_JIT_REMOTE_MIN_THROUGHPUT``): a server that trickles
#: bytes resets the read timeout at every byte, never this.
DEADLINE_S = 120.0
#: The longest total deadline of one operation, whatever the size and the throughput (a
#: week: a timer or a wait of ``1e12`` seconds overflows).
MAX_DEADLINE_S = 7 * 86400.0
#: Bytes per second (1 MB/s: a 100 MB library may take 100 s more than the base).
MIN_THROUGHPUT = 1_000_000


class Deadline:
    """The total time one remote operation may take, from its start.

    ``with deadline:`` arms a timer for the duration of the block; when it fires,
    :attr:`expired` is set and the callbacks given to :meth:`on_expiry` run (in the timer's
    thread): they close what the operation is blocked on (a socket), so that a read that
    waits for a trickle returns. The operation also checks :meth:`passed` between chunks.
    """

    def __init__(self, seconds: float) -> None:
        seconds = min(seconds, MAX_DEADLINE_S)  # a timer or a wait cannot take more
        self.seconds = seconds
        self.end = time.monotonic() + seconds
        self.expired = False
        self._aborts: list[Callable[[], object]] = []
        self._lock = threading.Lock()
        self._timer = threading.Timer(seconds, self.expire)
        self._timer.daemon = True

    def __enter__(self) -> Deadline:
        self._timer.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._timer.cancel()

    def remaining(self) -> float:
        return max(0.0, self.end - time.monotonic())

    def passed(self) -> bool:
        """Whether the deadline has passed (expiring it if it just did)."""
        if not self.expired and time.monotonic() >= self.end:
            self.expire()
        return self.expired

    def on_expiry(self, abort: Callable[[], object]) -> None:
        """Call ``abort`` when the deadline expires (at once if it has)."""
        with self._lock:
            if not self.expired:
                self._aborts.append(abort)
                return
        with contextlib.suppress(Exception):
            abort()

    def expire(self) -> None:
        with self._lock:
            self.expired = True
            aborts, self._aborts = self._aborts, []
        for abort in aborts:
            with contextlib.suppress(Exception):
                abort()
