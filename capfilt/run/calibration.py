"""The threshold a round uses: ``filter.threshold``, or one calibrated on the human split.

The calibration scores are stored in the run folder (``calibration.json``), so a resumed run reuses
them instead of scoring again, and ``capfilt select`` can re-derive a threshold without any model.
torch is imported only to score: a round's driver with a fixed or stored threshold stays without it
(importing torch and transformers takes 5-7 s of one core).
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

from capfilt.config import Config, ConfigError
from capfilt.data.specs import expand_shards
from capfilt.errors import UserError
from capfilt.run import ledger
from capfilt.stages.calibrate import CALIBRATION, calibrate, threshold_of

if TYPE_CHECKING:
    import torch


def human_pairs(human: list[str], cfg: Config) -> tuple[torch.Tensor, list[str]]:
    """The first ``filter.calibration_samples`` decodable human images with their (first) caption,
    decoded as a round decodes them."""
    from capfilt.eval.heldout import load_heldout

    data = load_heldout(expand_shards(human), cfg.run, limit=cfg.filter.calibration_samples)
    rows = [i for i, refs in enumerate(data.references) if (refs[0] or "").strip()]
    if len(rows) < 2:
        raise UserError(f"calibrating the threshold needs at least 2 human pairs; {human} gave {len(rows)}")
    return data.pixels[rows], [data.references[i][0] for i in rows]


def resolve_threshold(
    cfg: Config, out: str, filter_: str, filter_hash: str, human: list[str] | None
) -> tuple[float, str]:
    """(threshold, mode) for a round writing into ``out``: the config's, or calibrated and stored there."""
    mode = cfg.filter.calibration
    if mode == "none":
        return cfg.filter.threshold, "fixed"
    if not human:
        raise ConfigError(f"filter.calibration={mode} needs the human shards: pass --human")
    url = out.rstrip("/") + "/" + CALIBRATION
    cal = ledger.read_json(url)
    want = {
        "filter": filter_hash,
        "human": list(human),
        "samples": cfg.filter.calibration_samples,
        "dtype": cfg.run.dtype,
    }
    if cal is None or {k: cal.get(k) for k in want} != want:
        from capfilt.run.worker import default_device
        from capfilt.stages.filter import Filter

        pixels, captions = human_pairs(human, cfg)
        # The round's own device and dtype: its scores are what the threshold is compared with. ITM only:
        # calibration reads no ITC, so it skips that text pass.
        filt = Filter(filter_, dataclasses.replace(cfg.filter, itc=False), default_device(), cfg.run.dtype)
        cal = want | calibrate(filt, pixels, captions, cfg.run.seed)
        ledger.write_json(url, cal)
    return threshold_of(cal, mode, cfg.filter.keep_share), mode


def calibration_of(run_dir: str) -> dict[str, Any]:
    """A finished run's stored calibration scores; a clear error if it was not calibrated."""
    cal = ledger.read_json(run_dir.rstrip("/") + "/" + CALIBRATION)
    if cal is None:
        raise UserError(
            f"{run_dir} has no {CALIBRATION}: it ran with a fixed threshold; pass --threshold instead"
        )
    return cal


def threshold_used(run_dir: str) -> tuple[float, str]:
    """(threshold, mode) a finished run selected with, from its summary (older runs: the manifest's config)."""
    summary = ledger.read_json(run_dir.rstrip("/") + "/" + ledger.SUMMARY) or {}
    if "threshold" in summary:
        return float(summary["threshold"]), summary.get("threshold_mode", "fixed")
    return float(ledger.read_manifest(run_dir)["config"]["filter"]["threshold"]), "fixed"
