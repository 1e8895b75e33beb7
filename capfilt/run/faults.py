"""Test hooks that SIGKILL, or hold, the process cleaning a shard in the middle of it, or training.

Recovery from a dead worker (or driver, or node) can only be proven by killing one for real, at a known
point. When the environment variable ``CAPFILT_KILL_DIR`` names a folder, the process that has just
computed the first batch of shard NAME (or written training checkpoint NAME = ``JOB.step-N``, e.g.
``pretrain.step-4``):
- kills itself with SIGKILL if ``NAME.kill`` (text: a count) holds a positive count, after decrementing it;
- waits while ``NAME.hold`` exists, so a test can keep a shard in flight (and the rest queued) while it
  changes the cluster, then release it by deleting the file.
The folder is read at that moment, so a test can arm kills after Ray's workers have started. Without
the variable (always, outside the tests) this does nothing.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

KILL_DIR = "CAPFILT_KILL_DIR"


def maybe_kill(name: str) -> None:
    folder = os.environ.get(KILL_DIR)
    if not folder:
        return
    while (Path(folder) / f"{name}.hold").exists():
        time.sleep(0.05)
    armed = Path(folder) / f"{name}.kill"
    left = int(armed.read_text() or 0) if armed.exists() else 0
    if left <= 0:
        return
    armed.write_text(str(left - 1))
    os.kill(os.getpid(), signal.SIGKILL)
