"""Run shards in this process, one after another (``capfilt run --local``): for debugging and tiny runs.

Same worker, same shard function, same retry bound as the Ray pool; only where the work runs differs.
"""

from __future__ import annotations

import traceback
from collections.abc import Callable
from typing import Any

from capfilt.config import Config
from capfilt.data.sample import ShardStats
from capfilt.run.worker import ShardWorker


def run_local(
    cfg: Config,
    jobs: list[tuple[str, str]],
    out: str,
    captioner: str,
    filter_: str,
    provenance: dict[str, Any],
    on_done: Callable[[str, ShardStats], None],
    on_failed: Callable[[str, str], None],
) -> None:
    worker = ShardWorker(cfg, captioner, filter_, provenance)
    for url, name in jobs:
        error = ""
        for _ in range(cfg.run.max_shard_retries + 1):
            try:
                stats = worker.run(url, name, out)
            except Exception:
                error = traceback.format_exc()
                continue
            on_done(url, stats)
            break
        else:
            on_failed(url, error)
