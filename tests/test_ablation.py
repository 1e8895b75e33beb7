"""The ablation's pure parts: its selection policies, its table and gap arithmetic, its results file."""

from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest

from capfilt.ablation import (
    ORDER,
    keep_all,
    keep_matched,
    keep_web_matched,
    mean_ci,
    results_markdown,
    update_results,
)

CANDS = [
    {"text": "web ok", "source": "web", "itm": 0.7},
    {"text": "syn ok", "source": "synthetic", "itm": 0.5},
    {"text": "syn bad", "source": "synthetic", "itm": 0.2},
]


def test_policies_keep_what_each_variant_says():
    assert keep_all(CANDS, 0.5) == ["web ok", "syn ok", "syn bad"]
    assert keep_all([*CANDS, {"text": "", "source": "synthetic", "itm": 0.9}], 0.5) == keep_all(CANDS, 0.5)
    assert keep_matched([{"text": " ", "source": "synthetic", "itm": 0.9}], 0.5) == []
    assert keep_web_matched(CANDS, 0.5) == ["web ok"]
    assert keep_web_matched(CANDS, 0.8) == []
    assert keep_matched(CANDS, 0.5) == ["web ok", "syn ok"]  # the threshold is inclusive, as BLIP's


def _ev(r1: float) -> dict:
    return {
        "retrieval": {"tr@1": r1, "ir@1": r1, "tr@5": 1.0, "ir@5": 1.0},
        "captioning": {"cider": 0.5, "attribute_accuracy": 0.5},
    }


def test_gap_closed_is_measured_on_mean_r1():
    per_variant = {v: _ev(0.3) for v in ORDER}
    per_variant.update(noisy=_ev(0.2), capfilt=_ev(0.35), oracle=_ev(0.4))
    text = results_markdown({0: per_variant, 1: per_variant}, "capfilt ablation")
    assert "seed 0: 0.75, seed 1: 0.75 (mean 0.75 ± 0.00 over 2 seed(s))" in text
    assert "| noisy | 0.200 ± 0.000" in text
    assert "| oracle − noisy | +0.200 ± 0.000 | yes |" in text


def test_intervals_are_95_percent_t_intervals_over_seeds():
    assert mean_ci([1.0]) == (1.0, 0.0)
    m, h = mean_ci([1.0, 2.0, 3.0])  # sd 1, n 3, t(0.975, 2) = 4.303
    assert m == 2.0 and h == pytest.approx(4.303 / 3**0.5)
    evals = {}
    for seed, (noisy, capfilt) in enumerate([(0.2, 0.3), (0.4, 0.45), (0.3, 0.2)]):
        evals[seed] = {v: _ev(0.3) for v in ORDER} | {
            "noisy": _ev(noisy),
            "capfilt": _ev(capfilt),
            "oracle": _ev(0.5),
        }
    text = results_markdown(evals, "c")
    d, hd = mean_ci([0.1, 0.05, -0.1])
    assert f"| capfilt − noisy | {d:+.3f} ± {hd:.3f} | no |" in text


def test_update_results_keeps_the_prose(tmp_path):
    path = tmp_path / "RESULTS.md"
    update_results(path, "table v1")
    path.write_text(path.read_text() + "\nWhat we found.\n")
    update_results(path, "table v2")
    text = path.read_text()
    assert "table v2" in text and "table v1" not in text and "What we found." in text


@pytest.mark.parametrize("threshold", [0.0, 1.01])
def test_threshold_edges(threshold):
    assert len(keep_matched(CANDS, threshold)) == (3 if threshold == 0.0 else 0)


def test_gap_is_undefined_when_the_oracle_does_not_beat_noisy():
    per_variant = {v: _ev(0.3) for v in ORDER}
    per_variant.update(noisy=_ev(0.4), capfilt=_ev(0.2), oracle=_ev(0.2))
    text = results_markdown({0: per_variant}, "c")
    assert "seed 0: undefined (oracle ≤ noisy) (defined for no seed)" in text


@pytest.mark.slow
def test_ablation_end_to_end_at_the_tiny_size_two_seeds_side_by_side(tmp_path):
    """`capfilt ablation --parallel 2`: each seed in its own process, then the table from their finished
    steps. Every variant trains and evaluates, and the results file gets a row per variant. (``--local``:
    the cleaning runs in-process; the rounds' pools are tested in test_run_ray.py.)"""
    from typer.testing import CliRunner

    from capfilt.cli import app

    out, results = tmp_path / "out", tmp_path / "RESULTS.md"
    args = ["ablation", "--config", "tiny", "--seeds", "0,1", "--parallel", "2", "--local"]
    args += ["--world", str(tmp_path / "world"), "--out", str(out), "--results", str(results)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    for seed in (0, 1):  # each seed ran in its own process, which left its log and its own table
        assert "| noisy |" in (out / f"seed-{seed}.md").read_text()
        assert "round-0: pretrain ..." in (out / f"seed-{seed}.log").read_text()
    table = results.read_text()
    assert all(f"| {v} |" in table for v in ORDER) and "--seeds 0,1" in table
    assert "pretrain already done" in result.output  # the table came from the seeds' finished steps
    variant_pairs = {
        d.name: json.loads((d / "data.done").read_text())["pairs"]
        for d in (out / "seed-0").iterdir()
        if (d / "data.done").exists()
    }
    # +captioner keeps every web caption and every synthetic one that says something (one of each per web
    # image; a tiny captioner sometimes stops right after the prompt).
    written = [
        c["text"]
        for path in (out / "seed-0" / "boot" / "round-1" / "run").glob("*.scores.parquet")
        for row in pq.read_table(path, columns=["candidates"]).to_pylist()
        for c in row["candidates"]
        if c["source"] == "synthetic"
    ]
    assert len(written) == 64
    assert variant_pairs["+captioner"] == 64 + sum(bool(t.strip()) for t in written)
    assert variant_pairs["oracle"] == 64
    assert variant_pairs["+filter"] <= 64


def test_a_failed_seed_process_is_a_clear_error(tmp_path, monkeypatch):
    """A seed whose process fails stops the ablation with the seed and its log named."""
    from capfilt import ablation
    from capfilt.errors import UserError

    monkeypatch.setattr(ablation, "POLL_S", 0.1)
    with pytest.raises(UserError, match=r"seed 3 \(exit 2, log .*seed-3\.log\)"):
        ablation.run_side_by_side(["--no-such-option"], [3], 2, tmp_path)
    assert "No such option" in (tmp_path / "seed-3.log").read_text()
