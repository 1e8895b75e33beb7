"""The threshold a round uses: ``filter.threshold``, or one calibrated on the human split.

The calibration scores are stored in the run folder (``calibration.json``), so a resumed run reuses
them instead of scoring again, and ``capfilt select`` can re-derive a threshold without any model.
The scoring itself is a worker's (``ShardWorker.calibration``: a Ray actor, or the local runner's), on
the round's own device and dtype with the filter it loaded anyway, so a round's driver never imports
torch or transformers (5-7 s of one core) nor loads a model.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from capfilt.config import Config, ConfigError
from capfilt.data.signing import unsigned
from capfilt.data.specs import expand_shards
from capfilt.errors import UserError
from capfilt.run import ledger
from capfilt.stages.calibrate import CALIBRATION, threshold_of


def check_human(cfg: Config, human: list[str] | None) -> None:
    """Before a round starts anything: a calibrated threshold needs human shards, and they must exist."""
    if cfg.filter.calibration == "none":
        return
    if not human:
        raise ConfigError(f"filter.calibration={cfg.filter.calibration} needs the human shards: pass --human")
    expand_shards(human)  # a spec that matches nothing fails here, with the missing names


def resolve_threshold(
    cfg: Config,
    out: str,
    filter_hash: str,
    human: list[str] | None,
    score: Callable[[list[str]], dict[str, Any]],
) -> tuple[float, str, dict[str, Any] | None]:
    """(threshold, mode, scores) for a round writing into ``out``: the config's threshold, or one
    calibrated on scores stored there or from ``score(human)`` (``ShardWorker.calibration``; ``human``
    checked by ``check_human``).

    ``scores`` (None with a fixed threshold) are for the round to store (``store_calibration``) once the
    run folder has accepted the run, so that a refused rerun leaves the run's own scores in place, and a
    ``--new-run``, which clears the folder, keeps the scores it reused.
    """
    mode = cfg.filter.calibration
    if mode == "none":
        return cfg.filter.threshold, "fixed", None
    cal = ledger.read_json(out.rstrip("/") + "/" + CALIBRATION)
    want = {
        "filter": filter_hash,
        "human": [unsigned(url) for url in human],  # a re-signed URL is the same shard
        "samples": cfg.filter.calibration_samples,
        "dtype": cfg.run.dtype,
    }
    if cal is None or {k: cal.get(k) for k in want} != want:
        cal = want | score(expand_shards(human))
    return threshold_of(cal, mode, cfg.filter.keep_share), mode, cal


def store_calibration(out: str, scores: dict[str, Any]) -> None:
    """Keep the calibration scores in the run folder: a resumed run and ``capfilt select`` read them."""
    ledger.write_json(out.rstrip("/") + "/" + CALIBRATION, scores)


def calibration_of(run_dir: str, manifest: dict[str, Any]) -> dict[str, Any]:
    """A finished run's stored calibration scores; a clear error if it was not calibrated, or if they
    are another filter's (left by a run that folder held before, cleared since 2026-11-27)."""
    cal = ledger.read_json(run_dir.rstrip("/") + "/" + CALIBRATION)
    if cal is None:
        raise UserError(
            f"{run_dir} has no {CALIBRATION}: it ran with a fixed threshold; pass --threshold instead"
        )
    if cal.get("filter") != manifest["models"]["filter"]:
        raise UserError(
            f"{run_dir}/{CALIBRATION} was scored with another filter than the run's (a run that folder "
            "held before): pass --threshold, or run the round again with --human"
        )
    return cal


def threshold_used(run_dir: str) -> tuple[float, str]:
    """(threshold, mode) a finished run selected with, from its summary (older runs: the manifest's config)."""
    summary = ledger.read_json(run_dir.rstrip("/") + "/" + ledger.SUMMARY) or {}
    if "threshold" in summary:
        return float(summary["threshold"]), summary.get("threshold_mode", "fixed")
    return float(ledger.read_manifest(run_dir)["config"]["filter"]["threshold"]), "fixed"
