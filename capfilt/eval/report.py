"""``capfilt eval``: every evaluation that applies to what it is given, in one JSON-able dict.

A filter folder gives retrieval R@k on the test shards, a captioner folder captioning metrics (with
attribute accuracy when the demo world's truth is given), a finished round plus a labels file (truth
or any ``key, noisy`` Parquet) the filter's precision/recall on web captions. Without labels a round
is simply not scored: labels are evaluation-only and optional.
"""

from __future__ import annotations

from pathlib import Path

from capfilt import jsonio
from capfilt.config import Config
from capfilt.data.specs import expand_shards
from capfilt.errors import UserError
from capfilt.eval.captioning import evaluate_captioning
from capfilt.eval.filtering import round_metrics
from capfilt.eval.heldout import load_heldout
from capfilt.eval.retrieval import RERANK_K, evaluate_retrieval
from capfilt.run.calibration import threshold_used


def evaluate_all(
    cfg: Config,
    test: list[str],
    captioner=None,
    filter_=None,
    run_dir=None,
    truth=None,
    out=None,
    rerank_k: int | None = None,
) -> dict:
    """Run the evaluations that apply; write them to ``out`` as JSON when given.

    ``truth``: the demo world's truth.parquet or any labels file (``key``, ``noisy``; see filtering.py).
    ``rerank_k``: the ITC candidates per query that ITM reranks (``eval.retrieval``; None: its default).
    """
    metrics: dict = {}
    if captioner is not None or filter_ is not None:
        data = load_heldout(expand_shards(test), cfg.run)
        if not data.keys:
            ended = f"; ended early: {data.ended_early}" if data.ended_early else ""
            raise UserError(
                f"no held-out image to evaluate on in {test}: each needs a caption (json captions or a web "
                f"caption) and to decode; left out: {dict(data.rejects)}{ended}"
            )
        metrics["test"] = {
            "images": len(data.keys),
            "joined": data.joined,
            "rejected": dict(data.rejects),
            "ended_early": data.ended_early,
        }
        if filter_ is not None:
            metrics["retrieval"] = evaluate_retrieval(str(filter_), data, cfg.filter, rerank_k or RERANK_K)
        if captioner is not None:
            metrics["captioning"] = evaluate_captioning(str(captioner), data, cfg.caption, truth)
    if run_dir is not None and truth is not None:
        metrics["filtering"] = round_metrics(run_dir, truth, threshold_used(str(run_dir))[0])
    if out is not None:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(jsonio.dumps(metrics, indent=1))
    return metrics
