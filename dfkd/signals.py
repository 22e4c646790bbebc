"""SIGINT and SIGTERM during a run: noted, and honoured at the next iteration boundary."""

from __future__ import annotations

import signal
import threading
from contextlib import contextmanager


class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM, honoured at an iteration boundary; exits 128 + the signal's number."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.exit_code = 128 + signum


@contextmanager
def boundary_signals():
    """While the block runs, SIGINT and SIGTERM are noted, not raised: the loop stops at the next
    iteration boundary, so its checkpoint never holds half an iteration. A second signal stops at
    once (and no checkpoint is written)."""
    received: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield received
        return

    def note(signum, frame):
        if received:
            raise Interrupted(signum)
        received.append(signum)

    previous = {s: signal.signal(s, note) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield received
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
