"""Progress of a round (a rich bar on the driver) and its closing summary (``OUT/summary.json``).

The summary covers the whole run folder, including shards committed by an earlier, interrupted
invocation (their ``NAME.stats.json`` is read back); throughput counts only what this invocation
processed, over its wall time, and ``shards_already_done`` says how many were committed before it.
"""

from __future__ import annotations

import time
from collections import Counter
from typing import Any

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from capfilt.data.sample import ShardStats


def summarize(
    stats: list[ShardStats], failed: dict[str, str], processed: list[ShardStats], seconds: float
) -> dict[str, Any]:
    """Run totals from per-shard stats; raises if in != kept + dropped + rejected for the run."""
    rejected: Counter = Counter()
    kept_src: Counter = Counter()
    cand_src: Counter = Counter()
    for s in stats:
        rejected.update(s.rejected)
        kept_src.update(s.kept_by_source)
        cand_src.update(s.candidates_by_source)
    n_in, kept, dropped = (sum(getattr(s, f) for s in stats) for f in ("n_in", "kept", "dropped"))
    if n_in != kept + dropped + sum(rejected.values()):
        raise AssertionError(
            f"run: in={n_in} but kept+dropped+rejected={kept + dropped + sum(rejected.values())}"
        )
    n_new = sum(s.n_in for s in processed)
    timings: Counter = Counter()
    for s in processed:
        timings.update(s.timings)
    return {
        "shards": len(stats) + len(failed),
        "shards_done": len(stats),
        "failed_shards": dict(sorted(failed.items())),
        "truncated_shards": sorted(s.shard for s in stats if s.truncated),
        "n_in": n_in,
        "kept": kept,
        "dropped": dropped,
        "rejected": dict(sorted(rejected.items())),
        "no_web_caption": sum(s.no_web_caption for s in stats),
        "kept_rate": kept / n_in if n_in else 0.0,
        "kept_by_source": dict(sorted(kept_src.items())),
        "kept_rate_by_source": {src: kept_src[src] / n for src, n in sorted(cand_src.items()) if n},
        "candidates_by_source": dict(sorted(cand_src.items())),
        "shards_already_done": len(stats) - len(processed),
        "this_invocation": {
            "shards": len(processed),
            "n_in": n_new,
            "seconds": seconds,
            "images_per_s": n_new / seconds if seconds > 0 else 0.0,
            "stage_seconds": {k: round(v, 3) for k, v in sorted(timings.items())},
        },
    }


class RoundProgress:
    """Shards done/total, samples/s and kept rate, updated as shards finish."""

    def __init__(self, total: int, already_done: int, enabled: bool = True):
        self.start = time.perf_counter()
        self.n_in = self.kept = 0
        self.progress = Progress(
            TextColumn("[bold]capfilt run"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TextColumn("{task.fields[rate]}"),
            disable=not enabled,
        )
        self.task = self.progress.add_task("shards", total=total, completed=already_done, rate="")

    def __enter__(self) -> RoundProgress:
        self.progress.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self.progress.__exit__(*exc)

    def shard_done(self, stats: ShardStats) -> None:
        self.n_in += stats.n_in
        self.kept += stats.kept
        elapsed = time.perf_counter() - self.start
        rate = f"{self.n_in / elapsed:.1f} samples/s, kept {self.kept / max(self.n_in, 1):.1%}"
        self.progress.update(self.task, advance=1, rate=rate)

    def shard_failed(self, url: str, error: str) -> None:
        self.progress.console.print(
            f"[red]shard failed[/red] {url}: {error.splitlines()[-1] if error else ''}"
        )
        self.progress.update(self.task, advance=1)
