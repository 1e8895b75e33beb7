"""A run's summary, folded from per-shard stats without keeping them."""

import gc
import weakref

import pytest

from capfilt.data.sample import Reject, ShardStats
from capfilt.run.progress import RoundProgress, RunTotals, failed_note


def shard(name: str, kept: int, dropped: int, rejects: int, truncated: bool = False) -> ShardStats:
    s = ShardStats(name, n_in=kept + dropped + rejects, kept=kept, dropped=dropped, truncated=truncated)
    s.truncation_detail = "cut inside x.jpg" if truncated else ""
    for i in range(rejects):
        s.reject(Reject(f"{name}-{i}", name, "undecodable_image", "OSError: truncated"))
    s.kept_by_source, s.candidates_by_source = {"synthetic": kept}, {"web": kept + dropped, "synthetic": kept}
    s.no_web_caption, s.timings = 1, {"caption": 1.5, "score": 2.0}
    return s


def test_the_summary_folds_every_shard_and_times_only_this_invocations():
    totals = RunTotals()
    totals.add(shard("b.tar", 8, 1, 1, truncated=True), processed=True)
    totals.add(shard("c.tar", 5, 5, 0), processed=True)
    totals.add(shard("a.tar", 9, 0, 2), processed=False)  # committed by an earlier invocation
    summary = totals.summary({"d.tar": "boom"}, seconds=10.0)
    assert (summary["shards"], summary["shards_done"], summary["shards_already_done"]) == (4, 3, 1)
    assert (summary["n_in"], summary["kept"], summary["dropped"]) == (31, 22, 6)
    assert summary["rejected"] == {"undecodable_image": 3} and summary["no_web_caption"] == 3
    assert summary["truncated_shards"] == ["b.tar"] and summary["failed_shards"] == {"d.tar": "boom"}
    assert summary["ended_early"] == {"b.tar": "cut inside x.jpg"}
    assert summary["kept_by_source"] == {"synthetic": 22}
    assert failed_note(summary).startswith("1 of 4 shards failed (d.tar: boom); summary.json")
    assert summary["kept_rate_by_source"] == {"synthetic": 1.0, "web": 0.0}
    assert summary["this_invocation"] == {
        "shards": 2,
        "n_in": 20,
        "seconds": 10.0,
        "images_per_s": 2.0,
        "stage_seconds": {"caption": 3.0, "score": 4.0},
    }


def test_a_run_that_lost_a_sample_raises():
    totals = RunTotals()
    bad = shard("a.tar", 3, 1, 0)
    bad.n_in += 1
    totals.add(bad, processed=True)
    with pytest.raises(AssertionError, match="in=5 but kept\\+dropped\\+rejected=4"):
        totals.summary({}, 1.0)


def test_no_shard_stats_outlive_their_fold():
    """Each shard's reject records (kilobytes per shard) stay in its stats.json, not in the driver."""
    totals, refs = RunTotals(), []
    for i in range(3):
        s = shard(f"s{i}.tar", 5, 5, 100, truncated=i == 0)
        refs.append(weakref.ref(s))
        totals.add(s, processed=True)
        del s
    gc.collect()
    assert [r() for r in refs] == [None] * 3 and totals.summary({}, 1.0)["rejected"][
        "undecodable_image"
    ] == 300


def test_a_failed_shard_is_printed_whole(capsys):
    """Brackets in a URL or a reason (pip's extras in an install hint) reach the console: rich took them
    for markup and printed ``pip install 'capfilt'``."""
    with RoundProgress(1, 0) as progress:
        progress.shard_failed("b/web-[0].tar", "ImportError: pip install 'capfilt[dali]'")
    said = capsys.readouterr()
    assert "b/web-[0].tar: ImportError: pip install 'capfilt[dali]'" in said.out + said.err
