"""Progress of a round (a rich bar on the driver) and its closing summary (``OUT/summary.json``).

The summary covers the whole run folder, including shards committed by an earlier, interrupted
invocation (their ``NAME.stats.json`` is read back); throughput counts only what this invocation
processed, over its wall time, and ``shards_already_done`` says how many were committed before it.
"""

from __future__ import annotations

import time
from collections import Counter
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from capfilt.data.sample import ShardStats
from capfilt.errors import last_line


class RunTotals:
    """The run's totals, folded from each shard's stats as it is committed or read back.

    Why a fold: a shard's stats carry a record per reject (its key and detail, 26 KB for a 10,000-sample
    shard with 100 rejects), already written to its ``NAME.stats.json``. A driver that kept every
    shard's stats for the summary would grow with the corpus; this keeps counters, and the names of
    truncated and unordered shards only.
    """

    def __init__(self) -> None:
        self.shards = self.processed = self.n_new = 0
        self.counts: Counter = Counter()  # n_in, kept, dropped, no_web_caption
        self.rejected: Counter = Counter()
        self.kept_src: Counter = Counter()
        self.cand_src: Counter = Counter()
        self.timings: Counter = Counter()  # stage seconds of the shards this invocation processed
        self.truncated: dict[str, str] = {}  # shard → why it ended early
        self.unordered: list[str] = []
        self.input_sha256: dict[str, str] = {}  # per committed shard, for the card: as big as its input list
        self.kept_by_shard: dict[str, int] = {}  # per committed shard, for the card's sizes.json

    def add(self, s: ShardStats, processed: bool) -> None:
        """One committed shard; ``processed`` if this invocation cleaned it (else an earlier one did)."""
        self.shards += 1
        self.counts.update({f: getattr(s, f) for f in ("n_in", "kept", "dropped", "no_web_caption")})
        self.rejected.update(s.rejected)
        self.kept_src.update(s.kept_by_source)
        self.cand_src.update(s.candidates_by_source)
        if s.truncated:
            self.truncated[s.shard] = s.truncation_detail
        if s.unordered:
            self.unordered.append(s.shard)
        if s.input_sha256:
            self.input_sha256[s.shard] = s.input_sha256
        self.kept_by_shard[s.shard] = s.kept
        if processed:
            self.processed += 1
            self.n_new += s.n_in
            self.timings.update(s.timings)

    def summary(self, failed: dict[str, str], seconds: float) -> dict[str, Any]:
        """The run's summary; raises if in != kept + dropped + rejected for the run."""
        n_in, kept, dropped = (self.counts[f] for f in ("n_in", "kept", "dropped"))
        if n_in != kept + dropped + sum(self.rejected.values()):
            raise AssertionError(
                f"run: in={n_in} but kept+dropped+rejected={kept + dropped + sum(self.rejected.values())}"
            )
        kept_src, cand_src = self.kept_src, self.cand_src
        return {
            "shards": self.shards + len(failed),
            "shards_done": self.shards,
            "failed_shards": dict(sorted(failed.items())),
            "truncated_shards": sorted(self.truncated),
            "ended_early": dict(sorted(self.truncated.items())),  # the same shards, with why
            "unordered_shards": sorted(self.unordered),
            "n_in": n_in,
            "kept": kept,
            "dropped": dropped,
            "rejected": dict(sorted(self.rejected.items())),
            "no_web_caption": self.counts["no_web_caption"],
            "kept_rate": kept / n_in if n_in else 0.0,
            "kept_by_source": dict(sorted(kept_src.items())),
            "kept_rate_by_source": {src: kept_src[src] / n for src, n in sorted(cand_src.items()) if n},
            "candidates_by_source": dict(sorted(cand_src.items())),
            "shards_already_done": self.shards - self.processed,
            "this_invocation": {
                "shards": self.processed,
                "n_in": self.n_new,
                "seconds": seconds,
                "images_per_s": self.n_new / seconds if seconds > 0 else 0.0,
                "stage_seconds": {k: round(v, 3) for k, v in sorted(self.timings.items())},
            },
        }


def failed_note(summary: dict[str, Any]) -> str:
    """One line for a run with failed shards: how many, the first one's reason, and what to do."""
    failed = summary["failed_shards"]
    url, error = next(iter(failed.items()))
    reason = last_line(error) or "no reason given"
    return (
        f"{len(failed)} of {summary['shards']} shards failed ({url}: {reason}); summary.json has every "
        "reason. Fix the cause and rerun the same command: the committed shards are kept"
    )


def input_notes(summary: dict[str, Any]) -> list[str]:
    """A line for each kind of input that a run cleaned only in part or read the long way, which the
    summary alone would leave unsaid: shards that ended early (an error page or an empty file saved as a
    shard is one that ends at once), shards not in key order, and a corpus none of whose samples had a web
    caption where ``run.caption_from`` looks."""
    notes: list[str] = []
    cut, unordered = summary.get("truncated_shards", []), summary.get("unordered_shards", [])
    if cut:
        why = summary.get("ended_early", {}).get(cut[0]) or "`capfilt inspect SHARD` says why"
        notes.append(
            f"{len(cut)} of {summary['shards']} shards ended early ({_named(cut, why)}; ended_early in "
            "summary.json): the samples before the end were cleaned, and a sample the end cut into is "
            "rejected as truncated. After a fix, rerun the same command: changed inputs are cleaned again"
        )
    if unordered:
        notes.append(
            f"{len(unordered)} of {summary['shards']} shards were not in key order ({_named(unordered)}; "
            "unordered_shards in summary.json): a key's files stood apart, as in a tar of a folder written "
            "without --sort=name. Each was read a second time, grouped by key, so every sample is whole, and "
            "its outputs hold each sample's files together; webdataset would read such an input in parts"
        )
    scored = summary.get("kept", 0) + summary.get("dropped", 0)
    if scored and summary.get("no_web_caption") == scored:
        notes.append(
            f"none of the {scored} samples cleaned had a web caption where run.caption_from looks (by default "
            "a txt member, else the json's caption), so each was judged on synthetic captions alone; if the "
            "corpus keeps its alt-text elsewhere (`capfilt inspect SHARD` shows where), set run.caption_from "
            "and rerun with --new-run"
        )
    return notes


def _named(shards: list[str], detail: str = "") -> str:
    """The first shard (with ``detail``, why) and how many more."""
    first = f"{shards[0]}: {detail}" if detail else shards[0]
    return first + (f" and {len(shards) - 1} more" if len(shards) > 1 else "")


class RoundProgress:
    """Shards done/total, samples/s and kept rate, updated as shards finish; on stderr, so that stdout
    holds only the command's result (the summary as JSON)."""

    def __init__(self, total: int, already_done: int, enabled: bool = True):
        self.start = time.perf_counter()
        self.n_in = self.kept = 0
        self.progress = Progress(
            TextColumn("[bold]capfilt run"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TextColumn("{task.fields[rate]}"),
            console=Console(stderr=True),
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
        # escaped: rich read "capfilt[dali]" in an install hint, or "[0]" in a URL, as markup and dropped it
        self.progress.console.print(f"[red]shard failed[/red] {escape(url)}: {escape(last_line(error))}")
        self.progress.update(self.task, advance=1)
