"""The training loss curve: bounded, the means of the steps it covers, the same after a resume."""

import json

import pytest

from capfilt.train.curve import LossCurve


def steps(first: int, last: int):
    """Step i's values: a loss that counts the step, and a constant."""
    return [(i, {"loss": float(i), "lr": 0.5}) for i in range(first, last + 1)]


def test_points_merge_in_pairs_and_stay_the_means_of_their_steps():
    curve = LossCurve(max_points=4)
    for step, values in steps(1, 11):
        curve.add(step, values)
        assert len(curve.points) <= 4
    # 1-4 then 5-8 at width 4, and 9-11 filling the next point
    assert [(p["step"], p["steps"]) for p in curve.points] == [(4, 4), (8, 4), (11, 3)]
    assert [p["loss"] for p in curve.points] == [2.5, 6.5, 10.0]
    assert all(p["lr"] == 0.5 for p in curve.points)
    assert sum(p["steps"] for p in curve.points) == 11


def test_a_long_run_keeps_max_points_and_covers_every_step():
    curve = LossCurve(max_points=10)
    for step, values in steps(1, 1000):
        curve.add(step, values)
    assert 5 <= len(curve.points) <= 10 and curve.points[-1]["step"] == 1000
    assert sum(p["steps"] for p in curve.points) == 1000
    start = 0
    for p in curve.points:  # each point is the mean of exactly the steps it says it covers
        assert p["loss"] == pytest.approx(sum(range(start + 1, p["step"] + 1)) / p["steps"])
        assert p["step"] - start == p["steps"]
        start = p["step"]


def test_a_curve_resumed_from_its_json_ends_as_an_uninterrupted_one():
    straight = LossCurve(max_points=6)
    for step, values in steps(1, 40):
        straight.add(step, values)
    for cut in (1, 7, 13, 24):
        first = LossCurve(max_points=6)
        for step, values in steps(1, cut):
            first.add(step, values)
        resumed = LossCurve(json.loads(json.dumps(first.points)), max_points=6)
        for step, values in steps(cut + 1, 40):
            resumed.add(step, values)
        assert resumed.points == straight.points


def test_one_point_is_no_curve():
    with pytest.raises(ValueError, match="at least 2"):
        LossCurve(max_points=1)
