"""Run shards in this process, one after another (``capfilt run --local``): for debugging and tiny runs.

Same worker, same shard function, same retry bound as the Ray pool; only where the work runs differs.
"""

from __future__ import annotations

import time
import traceback
from collections.abc import Callable
from typing import Any

from capfilt.config import Config
from capfilt.data.sample import ShardStats
from capfilt.run.dispatch import RoundOutput
from capfilt.run.lease import LeaseLost
from capfilt.run.worker import ShardWorker


class LocalPool:
    """One ShardWorker in this process, loaded on first need (calibration or the first shard)."""

    def __init__(self, cfg: Config, captioner: str, filter_: str):
        self.cfg, self.captioner, self.filter = cfg, captioner, filter_
        self.worker: ShardWorker | None = None
        self.build_seconds: list[float] = []

    def _ensure(self) -> ShardWorker:
        if self.worker is None:
            start = time.perf_counter()
            self.worker = ShardWorker(self.cfg, self.captioner, self.filter)
            self.build_seconds = [round(time.perf_counter() - start, 3)]
        return self.worker

    def startup(self) -> dict[str, Any]:
        """Loading the worker's models (this process has imported them already)."""
        return {"workers": self.build_seconds}

    def calibration(self, human: list[str]) -> dict[str, Any]:
        return self._ensure().calibration(human)

    def close(self) -> None:
        self.worker = None

    def run(
        self,
        jobs: list[tuple[str, str]],
        output: RoundOutput,
        on_done: Callable[[str, ShardStats], None],
        on_failed: Callable[[str, str], None],
        stop: Callable[[], bool] = lambda: False,
    ) -> None:
        """Clean ``jobs`` one after another until done or ``stop()``."""
        if not jobs:
            return
        worker = self._ensure()  # a worker that cannot be built fails the run, not each shard in turn
        for url, name in jobs:
            if stop():
                return
            error = ""
            for _ in range(self.cfg.run.max_shard_retries + 1):
                try:
                    stats = worker.run(url, name, output)
                except LeaseLost:  # another job holds the folder now: no retry, no other shard
                    raise
                except Exception:
                    error = traceback.format_exc()
                    continue
                on_done(url, stats)
                break
            else:
                on_failed(url, error)
