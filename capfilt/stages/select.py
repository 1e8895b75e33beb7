"""The selection policy: which captions survive the filter. Pure functions over scores, no model.

BLIP keeps a caption, web or synthetic, when its ITM match probability is at least 0.5; a sample stays
in the cleaned corpus when any of its captions does. An empty caption (a captioner that stopped right
after the prompt) states nothing and is never kept, whatever its score: a low calibrated threshold
would otherwise put "" into the cleaned corpus. Because every score is stored, ``capfilt select``
can re-apply this policy with another threshold later without captioning or scoring again.
"""

from __future__ import annotations

import dataclasses

from capfilt.data.sample import Candidate, Sample, ScoredSample


def passes(candidate: Candidate, threshold: float) -> bool:
    """ITM >= threshold (NaN never passes), and some text to keep."""
    return bool(candidate.itm >= threshold) and bool(candidate.text.strip())


def select(candidates: list[Candidate], threshold: float = 0.5) -> tuple[list[Candidate], str]:
    """The candidates that :func:`passes` and the text of the best of them.

    Best = highest ITM; ties go to the web caption, then to the earlier candidate. "" when none is kept.
    """
    kept = [(i, c) for i, c in enumerate(candidates) if passes(c, threshold)]
    if not kept:
        return [], ""
    _, best = max(kept, key=lambda ic: (ic[1].itm, ic[1].source == "web", -ic[0]))
    return [c for _, c in kept], best.text


def decide(sample: Sample, candidates: list[Candidate], threshold: float = 0.5) -> ScoredSample:
    """A ScoredSample with each candidate's ``kept`` flag set by :func:`select`; inputs are not mutated."""
    marked = [dataclasses.replace(c, kept=passes(c, threshold)) for c in candidates]
    kept, best = select(marked, threshold)
    return ScoredSample(sample=sample, candidates=marked, kept=bool(kept), caption=best)
