"""How well the filter finds noisy web captions, measured against labels.

Labels are any Parquet file with ``key`` and ``noisy`` columns: the demo world's truth.parquet, or a
sample of a team's own web pairs labelled by hand. ``split`` (only ``web`` rows count) and
``noise_type`` (recall per type) are used when present. The decision scored is "drop the web caption"
(its ITM match probability < threshold) against ``noisy``, over the labelled web samples a round scored. ROC-AUC is the rank statistic (Mann-Whitney U, ties
counted half), written out so that no sklearn is needed.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
from fsspec.core import url_to_fs


def roc_auc(scores: Sequence[float], labels: Sequence[bool]) -> float:
    """P(score of a random positive > score of a random negative), ties counted half; nan if one class."""
    scores, labels = np.asarray(scores, dtype=np.float64), np.asarray(labels, dtype=bool)
    n_pos, n_neg = int(labels.sum()), int((~labels).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(scores, kind="mergesort")
    ranks = np.empty(len(scores))
    sorted_scores = scores[order]
    start = 0
    while start < len(scores):  # average rank (1-based) over each run of ties
        end = start
        while end + 1 < len(scores) and sorted_scores[end + 1] == sorted_scores[start]:
            end += 1
        ranks[order[start : end + 1]] = (start + end) / 2 + 1
        start = end + 1
    u = ranks[labels].sum() - n_pos * (n_pos + 1) / 2
    return float(u / (n_pos * n_neg))


def drop_metrics(itm: Sequence[float], noisy: Sequence[bool], threshold: float = 0.5) -> dict:
    """Precision, recall, F1 and ROC-AUC of "drop when ITM < threshold" as a detector of noisy captions.

    ``base_rate`` (the share of noisy captions) is the precision of dropping at random: the bar to beat.
    """
    itm, noisy = np.asarray(itm, dtype=np.float64), np.asarray(noisy, dtype=bool)
    drop = itm < threshold
    tp = int((drop & noisy).sum())
    precision = tp / drop.sum() if drop.any() else float("nan")
    recall = tp / noisy.sum() if noisy.any() else float("nan")
    f1 = 2 * precision * recall / (precision + recall) if tp else 0.0
    return {
        "n": len(itm),
        "threshold": threshold,
        "base_rate": float(noisy.mean()) if len(noisy) else float("nan"),
        "dropped": int(drop.sum()),
        "precision": float(precision),
        "recall": float(recall),
        "f1": float(f1),
        "roc_auc": roc_auc(-itm, noisy),  # a low match probability should mean noisy
    }


def web_itm_scores(run_dir: str | Path) -> dict[str, float]:
    """key → ITM probability of the web candidate, from every ``*.scores.parquet`` of a finished round
    (a local folder or a URL)."""
    scores = {}
    fs, root = url_to_fs(str(run_dir))
    for path in sorted(fs.glob(f"{root.rstrip('/')}/**/*.scores.parquet")):
        for row in pq.read_table(path, columns=["key", "candidates"], filesystem=fs).to_pylist():
            for cand in row["candidates"]:
                if cand["source"] == "web":
                    scores[row["key"]] = cand["itm"]
    return scores


def read_labels(path: str | Path) -> list[dict]:
    """The web rows of a labels file as ``{key, noisy, noise_type}`` (noise_type None when absent)."""
    table = pq.read_table(path)
    missing = {"key", "noisy"} - set(table.column_names)
    if missing:
        raise ValueError(f"{path}: a labels file needs the columns key and noisy; it lacks {sorted(missing)}")
    cols = [c for c in ("key", "noisy", "split", "noise_type") if c in table.column_names]
    rows = table.select(cols).to_pylist()
    return [
        {"key": r["key"], "noisy": bool(r["noisy"]), "noise_type": r.get("noise_type")}
        for r in rows
        if r.get("split", "web") == "web"
    ]


def round_metrics(run_dir: str | Path, labels: str | Path, threshold: float = 0.5) -> dict:
    """``drop_metrics`` of a round's web captions against a labels file, plus recall per noise type.

    Labelled samples without a scored web caption (rejected, or no web caption) are counted in ``missing``.
    """
    scores = web_itm_scores(run_dir)
    rows = read_labels(labels)
    scored = [r for r in rows if r["key"] in scores]
    itm = np.array([scores[r["key"]] for r in scored])
    noisy = np.array([r["noisy"] for r in scored])
    metrics = drop_metrics(itm, noisy, threshold)
    metrics["missing"] = len(rows) - len(scored)
    types = sorted({r["noise_type"] for r in scored if r["noisy"] and r["noise_type"]})
    metrics["recall_by_noise_type"] = {}
    for t in types:
        of_type = np.array([r["noisy"] and r["noise_type"] == t for r in scored])
        metrics["recall_by_noise_type"][t] = float((itm[of_type] < threshold).mean())
    return metrics
