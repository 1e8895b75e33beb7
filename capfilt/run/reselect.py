"""``capfilt select``: apply another threshold to a finished round without loading any model.

The threshold is given, or derived again from the run's stored calibration scores (``calibration.json``:
the human pairs' ITM, scored when the run was calibrated), e.g. with another ``keep_share``.

Scores come from each committed shard's ``NAME.scores.parquet``; image bytes, json and extra members
come from re-reading the input shards the manifest lists (the scores file does not hold images), one
sample at a time into the new shard's writer. Rejects are carried over from the old stats, so in = kept
+ dropped + rejected still holds.
"""

from __future__ import annotations

from typing import Any

import pyarrow.parquet as pq
from fsspec.core import url_to_fs

from capfilt.config import ConfigError, FilterConfig, from_dict
from capfilt.data import reader, writer
from capfilt.data.sample import Candidate, Sample, ShardStats
from capfilt.data.signing import unsigned
from capfilt.errors import UserError
from capfilt.run import card, ledger
from capfilt.run.calibration import calibration_of, store_calibration
from capfilt.run.lease import Lease, RunBusy, holder
from capfilt.run.pipeline import count_results
from capfilt.run.progress import RunTotals
from capfilt.run.round import given_shards
from capfilt.stages.calibrate import MODES, threshold_of
from capfilt.stages.select import decide

NAN = float("nan")


def _candidates(row: dict[str, Any]) -> list[Candidate]:
    return [
        Candidate(
            c["text"],
            c["source"],
            NAN if c["itm"] is None else c["itm"],
            NAN if c["itc"] is None else c["itc"],
        )
        for c in row["candidates"]
    ]


def reselect_shard(
    run_dir: str, out: str, url: str, read: str, name: str, threshold: float, mode: str = "fixed"
) -> ShardStats:
    """Select shard ``url`` of ``run_dir`` again into ``out``, its samples read from ``read`` (``url``
    itself, or a signed URL of it)."""
    (old,) = ledger.read_stats(run_dir, [name])
    fs, _ = url_to_fs(run_dir)
    with fs.open(f"{run_dir.rstrip('/')}/{name}.scores.parquet", "rb") as f:
        rows = {r["key"]: r for r in pq.read_table(f).to_pylist()}

    def select(samples: reader.ShardReader) -> ShardStats:  # read twice when not in key order (read_shard)
        stats = ShardStats(url, n_in=old.n_in, truncated=old.truncated, unordered=old.unordered)
        stats.truncation_detail = old.truncation_detail
        stats.input_sha256, stats.input_version = old.input_sha256, old.input_version
        stats.rejected, stats.rejects = dict(old.rejected), list(old.rejects)
        with writer.RoundShardWriter(out, name, _provenance(run_dir, name, threshold, mode)) as shard:
            for s in samples:  # scores rows are in the input's order, and so is the new shard
                if isinstance(s, Sample) and s.key in rows:
                    result = decide(s, _candidates(rows[s.key]), threshold)
                    count_results(stats, [result])
                    shard.add([result])
            if old.input_sha256 and samples.sha256 != old.input_sha256:
                raise UserError(
                    f"{url} has changed since {run_dir} scored it (its SHA-256): its scores may not be its "
                    "images'; re-run the round instead"
                )
            if stats.kept + stats.dropped != len(rows):
                raise UserError(
                    f"{url} no longer holds {len(rows) - stats.kept - stats.dropped} of the {len(rows)} "
                    f"samples that {run_dir} scored from it; re-run the round instead"
                )
            shard.commit(stats)
        return stats

    return reader.read_shard(read, select, fingerprint=True)


def _provenance(run_dir: str, name: str, threshold: float, mode: str) -> dict[str, Any]:
    """The shard's provenance in ``run_dir`` with the new threshold and where it came from."""
    data = ledger.read_json(f"{run_dir.rstrip('/')}/{name}.stats.json") or {}
    old = data.get("provenance", {})
    return {**old, "threshold": threshold, "threshold_mode": mode, "reselected_from": run_dir}


def reselect(
    run_dir: str,
    out: str,
    threshold: float = 0.5,
    calibration: str = "none",
    keep_share: float = 0.95,
    new_run: bool = False,
    shards: list[str] | None = None,
) -> dict[str, Any]:
    """Re-select every committed shard of ``run_dir`` into ``out``; returns the new summary.

    With ``calibration`` "keep" or "f1" the threshold comes from the run's calibration scores instead.
    ``out`` may hold this same selection, unfinished (it is done again); another run there is refused,
    or cleared with ``new_run``. Refused while a round still runs in ``run_dir``. The run's shards that
    are not committed there (they failed, or the round was stopped) are the selection's failed shards,
    so it never passes for the whole run: select again once the round has cleaned them. ``shards``:
    specs of signed URLs to read the run's input shards from (the run records none: ``data.signing``).
    """
    if calibration not in MODES:
        raise ConfigError(f"--calibration must be one of {list(MODES)}, got {calibration!r}")
    if ledger.location(out) == ledger.location(run_dir):
        raise UserError(f"select writes a new run: pass an --out other than {run_dir}")
    running = holder(run_dir)
    if running is not None:
        raise RunBusy(
            f"{run_dir}: a round is still running there (host {running['host']}, pid {running['pid']}); "
            "select once it has finished"
        )
    with Lease(out):
        return _reselect(run_dir, out, threshold, calibration, keep_share, new_run, shards or [])


def _reselect(
    run_dir: str,
    out: str,
    threshold: float,
    calibration: str,
    keep_share: float,
    new_run: bool,
    shards: list[str],
) -> dict[str, Any]:
    manifest = ledger.read_manifest(run_dir)
    ledger.check_out_folder(out, manifest["shards"])
    reads = given_shards(shards) if shards else {}
    unknown = sorted(set(reads) - {unsigned(u) for u in manifest["shards"]})
    if unknown:
        raise UserError(f"--shards names {len(unknown)} shard(s) that {run_dir} did not clean: {unknown[:3]}")
    mode = "fixed"
    if calibration != "none":
        cal = calibration_of(run_dir, manifest)
        threshold, mode = threshold_of(cal, calibration, keep_share), calibration
    names = ledger.shard_names(manifest["shards"])
    done = ledger.committed(run_dir, names)  # the markers read in batches
    committed = [u for u in manifest["shards"] if u in done]
    filter_cfg = {**manifest["config"]["filter"], "threshold": threshold}
    if calibration != "none":
        filter_cfg |= {"calibration": calibration, "keep_share": keep_share}
    from_dict(FilterConfig, filter_cfg, "filter")  # the config's own checks: a threshold in [0, 1]
    cfg = {**manifest["config"], "filter": filter_cfg}
    ledger.open_run(out, {**manifest, "config": cfg, "reselected_from": run_dir}, new_run=new_run)
    if calibration != "none":  # once the folder has accepted the run, as a round stores its scores
        store_calibration(out, cal)
    totals = RunTotals()
    for url in committed:
        read = reads.get(unsigned(url), url)
        try:
            totals.add(reselect_shard(run_dir, out, url, read, names[url], threshold, mode), processed=True)
        except FileNotFoundError as err:
            raise UserError(
                f"{url}: the input shard does not read again: it is gone, or it was read by a signed URL "
                "and needs one now (pass the signed URLs with --shards)"
            ) from err
    gone = (ledger.read_json(f"{run_dir.rstrip('/')}/{ledger.SUMMARY}") or {}).get("gone_shards", [])
    why = f"not committed in {run_dir}: its round failed on it or was stopped; rerun the round, then select"
    failed = {url: why for url in manifest["shards"] if url not in done and url not in gone}
    summary = totals.summary(failed, 0.0) | {
        "threshold": threshold,
        "threshold_mode": mode,
        "gone_shards": gone,
    }
    ledger.write_json(f"{out.rstrip('/')}/{ledger.SUMMARY}", summary)
    if committed:
        provenance = _provenance(run_dir, names[committed[0]], threshold, mode)
        kept = {names[u]: totals.kept_by_shard[u] for u in committed}
        info = card.dataset_info(ledger.read_manifest(out), summary, provenance, kept, totals.input_sha256)
        card.write_card(out, info)
    return summary
