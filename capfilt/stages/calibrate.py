"""A filter threshold set from the human split, for filters whose match probabilities are not BLIP's.

BLIP keeps a caption when ITM >= 0.5, which suits Salesforce's checkpoints. A filter trained briefly
(the demo's, or any small one) ranks captions well but its probabilities are compressed: clean captions
can peak under 0.5, and the fixed threshold then drops most of them. The human pairs are clean by
definition, so they can calibrate the threshold without any label of the web corpus:

- ``keep``: the ITM score that keeps ``keep_share`` of the human pairs (their lower quantile);
- ``f1``: the threshold with the best F1 at detecting mismatched pairs, built from the human split by
  giving each image another image's caption, against the true pairs.

The threshold functions are pure; :func:`calibrate` scores the human split with a filter.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from capfilt.data.decode import Planes

CALIBRATION = "calibration.json"
MODES = ("none", "keep", "f1")


def keep_threshold(human_itm: Sequence[float], keep_share: float) -> float:
    """The largest threshold that keeps at least ``keep_share`` of the human pairs' ITM scores."""
    scores = np.sort(np.asarray(human_itm, dtype=np.float64))
    if scores.size == 0:
        raise ValueError("calibration needs at least one human pair")
    if not 0.0 < keep_share <= 1.0:
        raise ValueError(f"keep_share must be in (0, 1], got {keep_share}")
    dropped = int(np.floor((1.0 - keep_share) * scores.size + 1e-9))
    return float(scores[min(dropped, scores.size - 1)])


def f1_threshold(matched_itm: Sequence[float], mismatched_itm: Sequence[float]) -> float:
    """The threshold maximising F1 of "drop when ITM < t" at finding the mismatched pairs.

    Candidate thresholds are the observed scores (a threshold between two scores acts like the upper
    one); ties in F1 go to the lower threshold, which keeps more.
    """
    pos = np.asarray(matched_itm, dtype=np.float64)
    neg = np.asarray(mismatched_itm, dtype=np.float64)
    if pos.size == 0 or neg.size == 0:
        raise ValueError("f1 calibration needs matched and mismatched pairs")
    candidates = np.unique(np.concatenate([pos, neg]))
    # drop = score < t: true drops are mismatched below t, false drops matched below t
    tp = np.searchsorted(np.sort(neg), candidates, side="left")
    fp = np.searchsorted(np.sort(pos), candidates, side="left")
    f1 = np.where(tp > 0, 2 * tp / (tp + fp + neg.size), 0.0)
    return float(candidates[int(np.argmax(f1))])


def mismatch(n: int, seed: int = 0) -> np.ndarray:
    """A permutation with no fixed point: image i gets caption ``perm[i]`` (a seeded cyclic shift)."""
    if n < 2:
        raise ValueError("mismatched pairs need at least two human images")
    order = np.random.default_rng(seed).permutation(n)
    perm = np.empty(n, dtype=np.int64)
    perm[order] = np.roll(order, 1)
    return perm


def threshold_of(cal: dict[str, Any], mode: str, keep_share: float) -> float:
    """The threshold of ``mode`` from stored calibration scores (``capfilt select`` needs no model)."""
    if mode == "keep":
        return keep_threshold(cal["human_itm"], keep_share)
    if mode == "f1":
        return f1_threshold(cal["human_itm"], cal["mismatched_itm"])
    raise ValueError(f"calibration mode must be one of {MODES[1:]}, got {mode!r}")


def calibrate(filt, pixels: Planes, captions: list[str], seed: int = 0) -> dict[str, Any]:
    """ITM scores of each human image with its own caption and with another image's caption (``filt`` is a
    stages.filter.Filter, which scores without gradients)."""
    perm = mismatch(len(captions), seed)
    human, mismatched = [], []
    for start in range(0, len(captions), filt.cfg.batch_size):
        rows = range(start, min(start + filt.cfg.batch_size, len(captions)))
        scored = filt.score(pixels[rows.start : rows.stop], [[captions[i], captions[perm[i]]] for i in rows])
        human += [own[0] for own, _ in scored]
        mismatched += [other[0] for _, other in scored]
    return {"n_human": len(captions), "human_itm": human, "mismatched_itm": mismatched}
