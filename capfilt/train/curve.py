"""The loss curve a training job keeps: at most ``max_points`` points, however many steps it runs.

Each point is the mean of consecutive steps' values (losses, lr, alpha), with ``step`` (the last step
it covers) and ``steps`` (how many). When the curve grows past ``max_points``, neighbouring points merge,
so every point then covers twice the steps. One record per step grew without bound instead: 1.5 million
steps of a 100M-pair pretraining held about 0.7 GB (456 bytes a record), and every checkpoint rewrote all
of it.

The curve is a pure function of the values in step order, so a job resumed from a checkpoint's curve
ends with the curve of an uninterrupted run.
"""

from __future__ import annotations

MAX_POINTS = 1000


class LossCurve:
    def __init__(self, points: list[dict] | None = None, max_points: int = MAX_POINTS):
        if max_points < 2:
            raise ValueError("a loss curve needs room for at least 2 points")
        self.points = [dict(p) for p in points or []]
        self.max_points = max_points

    @property
    def width(self) -> int:
        """Steps per point: only the last point may cover fewer."""
        return self.points[0]["steps"] if self.points else 1

    def add(self, step: int, values: dict[str, float]) -> None:
        last = self.points[-1] if self.points else None
        if last is None or last["steps"] == self.width:
            self.points.append({"step": step, "steps": 1, **values})
        else:
            self.points[-1] = _merge(last, {"step": step, "steps": 1, **values})
        if len(self.points) > self.max_points:
            pairs = zip(self.points[0::2], self.points[1::2])
            merged = [_merge(a, b) for a, b in pairs]
            self.points = merged + self.points[len(merged) * 2 :]


def _merge(a: dict, b: dict) -> dict:
    """One point for the steps of ``a`` then ``b``: their values' means weighted by steps."""
    n = a["steps"] + b["steps"]
    means = {k: (a[k] * a["steps"] + b[k] * b["steps"]) / n for k in a if k not in ("step", "steps")}
    return {"step": b["step"], "steps": n, **means}
