"""A test hook that SIGKILLs the process cleaning a shard, in the middle of it, a set number of times.

Recovery from a dead worker (or driver) can only be proven by killing one for real. When the
environment variable ``CAPFILT_KILL_DIR`` names a folder holding ``NAME.kill`` (text: a count), the
process that has just computed the first batch of shard NAME decrements the count and kills itself
with SIGKILL while the count was positive. The folder is read at that moment, so a test can arm kills
after Ray's workers have started. Without the variable (always, outside the tests) this does nothing.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

KILL_DIR = "CAPFILT_KILL_DIR"


def maybe_kill(name: str) -> None:
    folder = os.environ.get(KILL_DIR)
    if not folder:
        return
    armed = Path(folder) / f"{name}.kill"
    left = int(armed.read_text() or 0) if armed.exists() else 0
    if left <= 0:
        return
    armed.write_text(str(left - 1))
    os.kill(os.getpid(), signal.SIGKILL)
