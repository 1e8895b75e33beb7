"""The calibrated threshold: pure threshold rules, then a round and a re-selection that use it."""

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
from run_helpers import tiny_cfg

from capfilt.errors import UserError
from capfilt.run.ledger import RunMismatchError
from capfilt.run.local import LocalPool
from capfilt.run.reselect import reselect
from capfilt.run.round import run_round
from capfilt.stages.calibrate import f1_threshold, keep_threshold, mismatch

pytest_plugins = ["run_helpers"]  # tiny_models, tiny_shards


def test_keep_threshold_keeps_the_share_asked_for():
    scores = np.linspace(0.0, 1.0, 101)
    for share in (1.0, 0.95, 0.5, 0.01):
        t = keep_threshold(scores, share)
        assert (scores >= t).mean() >= share and (scores >= np.nextafter(t, 2)).mean() < share
    with pytest.raises(ValueError, match="keep_share"):
        keep_threshold(scores, 0.0)


def test_f1_threshold_separates_separable_scores_and_prefers_keeping():
    matched, mismatched = [0.6, 0.7, 0.8], [0.1, 0.2, 0.3]
    t = f1_threshold(matched, mismatched)
    assert 0.3 < t <= 0.6  # every mismatched pair dropped, every true pair kept
    assert t == 0.6  # among equal F1s, the lowest threshold (keeps the most)
    # overlapping scores: the best F1 is found by brute force over every threshold
    rng = np.random.default_rng(0)
    pos, neg = rng.normal(0.6, 0.1, 200), rng.normal(0.45, 0.1, 200)

    def f1(th):
        tp, fp = (neg < th).sum(), (pos < th).sum()
        return 2 * tp / (tp + fp + len(neg))

    best = max(f1(th) for th in np.concatenate([pos, neg]))
    assert f1(f1_threshold(pos, neg)) == pytest.approx(best)


def test_mismatch_gives_every_image_another_caption():
    for n in (2, 3, 10, 101):
        perm = mismatch(n, seed=n)
        assert sorted(perm) == list(range(n)) and not (perm == np.arange(n)).any()


def test_round_calibrates_on_human_pairs_records_it_and_select_rederives_it(
    tmp_path, tiny_models, tiny_shards, monkeypatch
):
    cap, flt = tiny_models
    out = str(tmp_path / "run")
    cfg = tiny_cfg("filter.calibration=keep", "filter.keep_share=0.8")
    with pytest.raises(ValueError, match="--human"):
        run_round(cfg, tiny_shards, out, cap, flt, local=True, progress=False)
    with pytest.raises(UserError, match="do not exist"):
        run_round(
            cfg, tiny_shards, out, cap, flt, local=True, progress=False, human=[str(tmp_path / "h.tar")]
        )
    assert not (tmp_path / "run").exists()  # refused before anything was written
    human = tiny_shards[1:]
    summary = run_round(cfg, tiny_shards, out, cap, flt, local=True, progress=False, human=human)
    cal = json.loads((tmp_path / "run" / "calibration.json").read_text())
    assert cal["n_human"] == 20 and len(cal["human_itm"]) == len(cal["mismatched_itm"]) == 20
    t = keep_threshold(cal["human_itm"], 0.8)
    assert (summary["threshold"], summary["threshold_mode"]) == (t, "keep")
    rows = pq.read_table(tmp_path / "run" / "web-000001.scores.parquet").to_pylist()
    assert all(c["kept"] == (c["itm"] >= t) for r in rows for c in r["candidates"])
    stats = json.loads((tmp_path / "run" / "web-000001.stats.json").read_text())
    assert (stats["provenance"]["threshold"], stats["provenance"]["threshold_mode"]) == (t, "keep")

    # a rerun reuses the stored scores: same threshold, same manifest, nothing redone
    again = run_round(cfg, tiny_shards, out, cap, flt, local=True, progress=False, human=human)
    assert again["threshold"] == t and again["this_invocation"]["shards"] == 0

    # a rerun that would calibrate on other human shards is refused, and the run's scores stay its own
    stored = (tmp_path / "run" / "calibration.json").read_bytes()
    with pytest.raises(RunMismatchError, match=r"(?s)filter\.threshold.*calibrated on --human"):
        run_round(cfg, tiny_shards, out, cap, flt, local=True, progress=False, human=tiny_shards[:1])
    assert (tmp_path / "run" / "calibration.json").read_bytes() == stored

    # a rerun with another config is refused before any model scores the human shards
    def no_scoring(self, human):
        raise AssertionError("calibrated before refusing the rerun")

    monkeypatch.setattr(LocalPool, "calibration", no_scoring)
    other = tiny_cfg("filter.calibration=keep", "filter.keep_share=0.8", "caption.top_p=0.5")
    with pytest.raises(RunMismatchError, match=r"caption\.top_p: 0\.9 → 0\.5"):
        run_round(other, tiny_shards, out, cap, flt, local=True, progress=False, human=tiny_shards[:1])

    # select re-derives a threshold from the stored human scores, without a model
    lax = reselect(out, str(tmp_path / "lax"), calibration="keep", keep_share=1.0)
    assert (lax["threshold"], lax["threshold_mode"]) == (min(cal["human_itm"]), "keep")
    f1 = reselect(out, str(tmp_path / "f1"), calibration="f1")
    assert f1["threshold"] == f1_threshold(cal["human_itm"], cal["mismatched_itm"])
    assert f1["n_in"] == lax["n_in"] == summary["n_in"]
    info = json.loads((tmp_path / "f1" / "dataset_info.json").read_text())  # the card says how it was set
    assert (info["threshold"]["value"], info["threshold"]["mode"]) == (f1["threshold"], "f1")
    fixed = reselect(str(tmp_path / "lax"), str(tmp_path / "fixed"), threshold=0.3)
    assert fixed["threshold_mode"] == "fixed"
    with pytest.raises(UserError, match="one of"):
        reselect(out, str(tmp_path / "typo"), calibration="kep")
    with pytest.raises(UserError, match="--threshold"):
        reselect(str(tmp_path / "fixed"), str(tmp_path / "again"), calibration="keep")

    # another selection into a selection's folder: refused, or cleared with new_run
    with pytest.raises(RunMismatchError, match="--new-run"):
        reselect(out, str(tmp_path / "lax"), calibration="keep", keep_share=0.5)
    half = reselect(out, str(tmp_path / "lax"), calibration="keep", keep_share=0.5, new_run=True)
    assert half["threshold"] == keep_threshold(cal["human_itm"], 0.5)

    # a new run calibrated like the old one reuses its scores (no_scoring still in place) and keeps them
    run_round(cfg, tiny_shards, out, cap, flt, local=True, progress=False, human=human, new_run=True)
    assert (tmp_path / "run" / "calibration.json").read_bytes() == stored

    # a new run in the folder clears the old run's scores, so select cannot mix them with its filter's
    monkeypatch.undo()
    run_round(tiny_cfg(), tiny_shards, out, cap, flt, local=True, progress=False, new_run=True)
    assert not (tmp_path / "run" / "calibration.json").exists()
    with pytest.raises(UserError, match="no calibration.json"):
        reselect(out, str(tmp_path / "stale"), calibration="keep")
    stale = json.loads(stored) | {"filter": "another filter's hash"}
    (tmp_path / "run" / "calibration.json").write_text(json.dumps(stale))
    with pytest.raises(UserError, match="scored with another filter"):  # left by a run before this change
        reselect(out, str(tmp_path / "stale"), calibration="keep")
