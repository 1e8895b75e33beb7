"""SIGTERM ends a command the way Ctrl-C does: through its cleanup.

Kubernetes, ``ray job stop``, Slurm's ``scancel``, systemd and ``timeout`` stop a job with SIGTERM, and
Python's default for it ends the process at once, running no ``finally``. A round stopped that way left
its lease in the folder, so a rerun on another host was refused as busy until the lease went stale
(``lease.STALE_S``), and its worker processes to notice the closed pipe on their own. Raised as
``SystemExit(143)`` in the main thread instead, SIGTERM runs what any other way out runs: the pool
closes, the lease is given back, and the exit status (128 + 15) says what ended the job.
"""

from __future__ import annotations

import contextlib
import signal
import sys
import threading
from collections.abc import Iterator
from typing import Any


def _exit(signum: int, frame: Any) -> None:
    print("capfilt: SIGTERM: stopping; a rerun resumes from what is committed", file=sys.stderr, flush=True)
    raise SystemExit(128 + signum)


def exit_on_sigterm() -> Any:
    """Make SIGTERM raise ``SystemExit(143)``; returns the handler it replaces (None outside the main
    thread, where Python takes no handler). ``ray.init`` sets its own (exit 15): call this after it."""
    if threading.current_thread() is not threading.main_thread():
        return None
    return signal.signal(signal.SIGTERM, _exit)


@contextlib.contextmanager
def sigterm_exits() -> Iterator[None]:
    """``exit_on_sigterm`` for a block; the previous handler afterwards (a test runner's, say)."""
    previous = exit_on_sigterm()
    try:
        yield
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
