import math

from capfilt.data.sample import Candidate, Sample
from capfilt.stages.select import decide, select


def c(text, source, itm):
    return Candidate(text=text, source=source, itm=itm, itc=0.0)


def test_keeps_at_threshold_and_best_is_highest_itm():
    cands = [c("web", "web", 0.2), c("s1", "synthetic", 0.5), c("s2", "synthetic", 0.9)]
    kept, best = select(cands, 0.5)
    assert [k.text for k in kept] == ["s1", "s2"]
    assert best == "s2"


def test_nothing_kept_gives_empty_caption_and_nan_never_passes():
    kept, best = select([c("web", "web", 0.49), c("s", "synthetic", math.nan)], 0.5)
    assert kept == [] and best == ""


def test_an_empty_caption_is_never_kept():
    """A captioner that stops right after the prompt writes "": at a low calibrated threshold it must not
    become the sample's caption (the check fails if select keeps by score alone)."""
    kept, best = select([c("web", "web", 0.1), c("", "synthetic", 0.9), c(" ", "synthetic", 0.8)], 0.05)
    assert [k.text for k in kept] == ["web"] and best == "web"
    sample = Sample(key="k", shard="x", image=b"", image_ext="jpg", caption="")
    scored = decide(sample, [c("", "synthetic", 0.9)], 0.5)
    assert not scored.kept and [m.kept for m in scored.candidates] == [False]


def test_ties_prefer_web_then_order():
    assert select([c("s1", "synthetic", 0.8), c("web", "web", 0.8)], 0.5)[1] == "web"
    assert select([c("s1", "synthetic", 0.8), c("s2", "synthetic", 0.8)], 0.5)[1] == "s1"


def test_decide_marks_candidates_without_mutating_inputs():
    sample = Sample(key="k", shard="x", image=b"", image_ext="jpg", caption="web")
    cands = [c("web", "web", 0.7), c("s", "synthetic", 0.1)]
    out = decide(sample, cands, 0.5)
    assert out.kept and out.caption == "web"
    assert [x.kept for x in out.candidates] == [True, False]
    assert [x.kept for x in cands] == [False, False]
    assert not decide(sample, cands, 0.95).kept
