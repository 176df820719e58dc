"""Stop signals (SIGINT, SIGTERM) for training: install one handler for both, and put the previous ones back.

Used by ``offset train`` from its first line (so a signal during the slow imports is remembered) and by the
trainer for the run itself; imports nothing heavy.
"""
from __future__ import annotations

import contextlib
import signal

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


@contextlib.contextmanager
def stop_signals_handled_by(handler):
    """Within the block, SIGINT and SIGTERM call ``handler(signum, frame)``; the previous handlers come back after
    it. Outside the main thread (where signals cannot be handled) it changes nothing."""
    previous = {}
    for sig in STOP_SIGNALS:
        try:
            previous[sig] = signal.signal(sig, handler)
        except ValueError:  # not in the main thread
            pass
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)
