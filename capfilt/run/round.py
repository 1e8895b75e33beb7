"""One CapFilt round over a list of shards: ledger, distribution, progress, summary.

``run_round`` is what ``capfilt run`` and ``pipelines/run_round.py`` call. It expands the shard specs,
opens the run folder (manifest; refuses a rerun with another config or models unless ``new_run``),
skips committed shards, runs the rest locally or on Ray, and writes ``OUT/summary.json`` and the
dataset card. The run covers every shard the folder's manifest lists, so a nightly rerun over a grown
shard list processes only the new shards (and any that failed before) and its summary covers them all.
"""

from __future__ import annotations

import time
from typing import Any

from capfilt.config import Config
from capfilt.data.sample import ShardStats
from capfilt.data.specs import expand_shards
from capfilt.model.hf import model_hash
from capfilt.run import card, ledger
from capfilt.run.progress import RoundProgress, summarize


def provenance_of(cfg: Config, models: dict[str, str]) -> dict[str, Any]:
    """What every output sample records about how it was made (no timestamps: reruns give equal bytes)."""
    return {
        "models": models,
        "seed": cfg.run.seed,
        "threshold": cfg.filter.threshold,
        "caption": cfg.to_dict()["caption"],
        "config": cfg.name,
    }


def connect_ray(address: str | None) -> bool:
    """Join ``address`` ("auto" under ``ray job submit``) or start a local Ray; True if we started it."""
    import ray

    if ray.is_initialized():
        return False
    if address is None:
        ray.init(include_dashboard=False)
    else:
        ray.init(address=address)
    return True


def run_round(
    cfg: Config,
    shards: list[str],
    out: str,
    captioner: str,
    filter_: str,
    local: bool = False,
    address: str | None = None,
    new_run: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Clean ``shards`` into ``out`` with the given captioner and filter; returns the summary."""
    start = time.perf_counter()
    models = {"captioner": model_hash(captioner), "filter": model_hash(filter_)}
    ledger.open_run(out, ledger.make_manifest(expand_shards(shards), cfg, models), new_run=new_run)
    manifest = ledger.read_manifest(out)
    urls = manifest["shards"]
    names = ledger.shard_names(urls)
    jobs = ledger.pending_shards(out, names, urls)
    done: dict[str, ShardStats] = {}
    failed: dict[str, str] = {}
    with RoundProgress(len(urls), len(urls) - len(jobs), enabled=progress) as bar:

        def on_done(url: str, stats: ShardStats) -> None:
            done[url] = stats
            bar.shard_done(stats)

        def on_failed(url: str, error: str) -> None:
            failed[url] = error
            bar.shard_failed(url, error)

        provenance = provenance_of(cfg, models)
        args = (cfg, jobs, out, captioner, filter_, provenance, on_done, on_failed)
        if local:
            from capfilt.run.local import run_local

            run_local(*args)
        else:
            import ray

            from capfilt.run.ray_pool import run_ray

            started = connect_ray(address)
            try:
                run_ray(*args)
            finally:
                if started:
                    ray.shutdown()
    committed = [done[u] if u in done else ledger.read_stats(out, names[u]) for u in urls if u not in failed]
    summary = summarize(committed, failed, list(done.values()), time.perf_counter() - start)
    ledger.write_json(out.rstrip("/") + "/" + ledger.SUMMARY, summary)
    committed_names = [names[u] for u in urls if u not in failed]
    card.write_card(out, card.dataset_info(manifest, summary, provenance, committed_names))
    return summary
