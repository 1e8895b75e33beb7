"""One CapFilt round over a list of shards: ledger, distribution, progress, summary.

``run_round`` is what ``capfilt run`` and ``pipelines/run_round.py`` call. It expands the shard specs,
opens the run folder (manifest; refuses a rerun with another config or models unless ``new_run``),
skips committed shards, runs the rest on Ray, on worker processes or in this process, and writes
``OUT/summary.json`` and the dataset card. The run covers every shard the folder's manifest lists, so a
nightly rerun over a grown shard list processes only the new shards, any that failed before, and any
whose input changed since it was cleaned; its summary covers them all. ``plan_round`` says which, doing
nothing (``capfilt run --dry-run``).
"""

from __future__ import annotations

import dataclasses
import sys
import time
from typing import Any

from capfilt.config import Config
from capfilt.data.sample import ShardStats
from capfilt.data.signing import read_urls, redact, unsigned
from capfilt.data.specs import canonical, expand_shards
from capfilt.errors import UserError
from capfilt.model.hub import model_hash, resolve_model
from capfilt.run import card, ledger
from capfilt.run.calibration import check_human, resolve_threshold, store_calibration
from capfilt.run.dispatch import RoundOutput
from capfilt.run.lease import Lease, LeaseLost, holder
from capfilt.run.progress import RoundProgress, RunTotals


def provenance_of(
    cfg: Config, models: dict[str, dict[str, Any]], threshold_mode: str = "fixed"
) -> dict[str, Any]:
    """What every output sample records about how it was made (no timestamps: reruns give equal bytes).

    ``models``: per role, the reference's ``id`` (folder or hub id), hub ``revision`` and weight ``hash``.
    ``threshold_mode`` says where ``threshold`` came from: "fixed" (the config) or a calibration mode.
    """
    return {
        "models": models,
        "seed": cfg.run.seed,
        "threshold": cfg.filter.threshold,
        "threshold_mode": threshold_mode,
        "caption": cfg.to_dict()["caption"],
        "dtype": cfg.run.dtype,
        "config": cfg.name,
    }


def identify_models(captioner: str, filter_: str) -> tuple[dict[str, dict[str, Any]], str, str]:
    """Each model as the provenance records it (the reference's ``id``, hub ``revision`` and weight
    ``hash``: a run's identity, however the model was referenced), and the two folders to load."""
    refs = {"captioner": resolve_model(captioner), "filter": resolve_model(filter_)}
    models = {
        role: {"id": r.id, "revision": r.revision, "hash": model_hash(r.path)} for role, r in refs.items()
    }
    return models, str(refs["captioner"].path), str(refs["filter"].path)


def say_shards(urls: list[str], what: str) -> None:
    """Tell the user, on stderr, about shards the round treats apart: how many, ``what``, the first few."""
    if urls:
        shown = ", ".join(urls[:3]) + (" ..." if len(urls) > 3 else "")
        print(f"[capfilt] {len(urls)} {what}: {shown}", file=sys.stderr, flush=True)


def given_shards(specs: list[str]) -> dict[str, str]:
    """The shards ``specs`` name: each one's identity (its URL without a signature, ``data.signing``) → the
    URL to read it from. A shard given twice, signed twice, is read once, and stderr says so."""
    given = expand_shards(specs)
    reads = read_urls(given)
    again = [unsigned(url) for url in given if reads[unsigned(url)] != url]
    say_shards(again, "shard URL(s) differ from another one given only in their signature: each is read once")
    return reads


def make_pool(
    cfg: Config,
    captioner: str,
    filter_: str,
    n_shards: int,
    local: bool,
    processes: bool,
    address: str | None,
    hashes: dict[str, str],
) -> Any:
    """Where the shards run: in this process (``local``), on worker processes of this machine
    (``processes``), or on Ray (a local one, or the cluster at ``address``). Each pool has the same
    ``calibration``, ``run``, ``startup`` and ``close``. ``hashes``: the models' weights, which name the
    warm actors (``run.keep_actors``)."""
    if local:
        from capfilt.run.local import LocalPool

        return LocalPool(cfg, captioner, filter_)
    if processes:
        from capfilt.run.process_pool import ProcessPool

        return ProcessPool(cfg, captioner, filter_, n_shards)
    from capfilt.run.ray_pool import RayPool, warm_prefix

    warm = warm_prefix(cfg, hashes) if cfg.run.keep_actors else None
    return RayPool(cfg, captioner, filter_, n_shards, address, warm)


def shards_to_clean(
    out: str, names: dict[str, str], reads: dict[str, str]
) -> tuple[list[tuple[str, str]], list[str], list[str]]:
    """Of the run's shards (``names``: url → output name, in the manifest's order), the (url, name) of
    those this invocation cleans, the urls among them whose input changed since they were cleaned, and
    the urls left out because their input is gone (not given to this invocation, never cleaned).
    ``reads``: each url given to this invocation → the URL to read it from (``signing.read_urls``).

    A changed shard's old outputs are cleared first, so the folder never serves an old input's outputs;
    temp files a killed run left are removed. Both kinds of shards treated apart are said on stderr.
    """
    jobs, changed = ledger.pending_shards(out, names, list(names), reads)
    gone = ledger.gone_inputs(jobs, list(reads))
    left_out = set(gone)
    jobs = [(url, name) for url, name in jobs if url not in left_out]
    say_shards(
        gone,
        "shard(s) named by earlier runs of this folder were never cleaned and their input is gone (or "
        "reads only by a signed URL, which this run was not given), so they are left out (summary.json's "
        "gone_shards)",
    )
    for url in changed:
        ledger.clear_shard(out, names[url])
    say_shards(changed, "input shard(s) changed since they were cleaned, cleaning them again")
    ledger.remove_stale_temps(out, [name for _, name in jobs])
    return jobs, changed, gone


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
    human: list[str] | None = None,
    processes: bool = False,
) -> dict[str, Any]:
    """Clean ``shards`` into ``out`` with the given captioner and filter (folders or HF hub ids); returns
    the summary. A run's identity is the models' weight hashes, however they were referenced.
    ``human`` (clean pairs) is needed only when ``filter.calibration`` sets the threshold from them.
    Where the work runs: on Ray (a local one, or the cluster at ``address``), on worker processes of this
    machine (``processes``), or in this process (``local``).
    """
    if local + processes + (address is not None) > 1:
        raise UserError("choose one of --local, --processes and --address")
    if cfg.run.keep_actors and address is None:  # before the lease creates the folder
        raise UserError(
            "run.keep_actors leaves the round's actors running in a Ray cluster for the next run: give the "
            "cluster's --address (a local Ray, --processes and --local all end with the run)"
        )
    start = time.perf_counter()
    out = canonical(out)  # a local -o made absolute: the workers of a running Ray work in another folder
    models, captioner, filter_ = identify_models(captioner, filter_)
    hashes = {role: m["hash"] for role, m in models.items()}
    reads = given_shards(shards)
    urls_given = list(reads)
    ledger.check_out_folder(out, urls_given)
    check_human(cfg, human)
    with Lease(out) as lease:  # one round at a time in a folder
        pool = make_pool(cfg, captioner, filter_, len(urls_given), local, processes, address, hashes)
        try:
            if not new_run:  # before Ray starts and any model is loaded; the threshold comes next
                ledger.check_rerun(
                    out, ledger.make_manifest(urls_given, cfg, hashes), ignore=(ledger.THRESHOLD,)
                )
            threshold, mode, scores = resolve_threshold(cfg, out, hashes["filter"], human, pool.calibration)
            cfg = dataclasses.replace(cfg, filter=dataclasses.replace(cfg.filter, threshold=threshold))
            ledger.open_run(out, ledger.make_manifest(urls_given, cfg, hashes), new_run=new_run)
            if scores is not None:
                store_calibration(out, scores)
            manifest = ledger.read_manifest(out)
            urls = manifest["shards"]
            names = ledger.shard_names(urls)
            jobs, changed, gone = shards_to_clean(out, names, reads)
            left_out = set(gone)
            totals, done = RunTotals(), set()
            failed: dict[str, str] = {}
            provenance = provenance_of(cfg, models, mode)
            shards_now = len(urls) - len(gone)
            with RoundProgress(shards_now, shards_now - len(jobs), enabled=progress) as bar:

                def on_done(url: str, stats: ShardStats) -> None:
                    done.add(unsigned(url))
                    totals.add(stats, processed=True)
                    bar.shard_done(stats)

                def on_failed(url: str, error: str) -> None:
                    url, error = unsigned(url), redact(error)  # an HTTP error names the signed URL
                    failed[url] = error
                    bar.shard_failed(url, error)

                output = RoundOutput(out, threshold, provenance, lease.owner)
                reading = [(reads.get(url, url), name) for url, name in jobs]
                pool.run(reading, output, on_done, on_failed, stop=lease.lost.is_set)
            startup = pool.startup()
        finally:
            closing = time.perf_counter()
            pool.close()
        closed = round(time.perf_counter() - closing, 3)
        if lease.lost.is_set():  # the job that took over cleans the rest and writes the summary
            raise LeaseLost(
                f"{out}: another job took this round's lease over while it was stalled; this one stopped "
                f"after {len(done)} shard(s) and leaves the rest, and the summary, to it"
            )
        ledger.remove_stale_temps(out, [name for _, name in jobs])  # left by workers killed in this run
        skip = done | set(failed) | left_out  # cleaned now, failed or gone: the rest were committed before
        earlier = [names[u] for u in urls if u not in skip]
        for stats in ledger.read_stats(out, earlier):
            totals.add(stats, processed=False)
        summary = totals.summary(failed, time.perf_counter() - start)
        summary["this_invocation"] |= {
            "startup_seconds": startup,
            "close_seconds": closed,
            "inputs_changed": changed,
        }
        summary |= {"threshold": threshold, "threshold_mode": mode, "gone_shards": gone}
        ledger.write_json(out.rstrip("/") + "/" + ledger.SUMMARY, summary)
        kept = {names[u]: totals.kept_by_shard[u] for u in urls if u not in failed and u not in left_out}
        card.write_card(out, card.dataset_info(manifest, summary, provenance, kept, totals.input_sha256))
        return summary


def plan_round(
    cfg: Config,
    shards: list[str],
    out: str,
    captioner: str,
    filter_: str,
    new_run: bool = False,
    human: list[str] | None = None,
) -> dict[str, Any]:
    """What ``run_round`` would do in ``out`` now, doing none of it (``capfilt run --dry-run``): no lease
    taken, no file written, no model loaded, no worker started (the models' weights are read for their
    hashes, the run's identity). It refuses what the round would refuse before its work: missing shards,
    an output folder holding the inputs, another config or models than the folder's run (unless
    ``new_run``, which would clear it: ``clears_run``), a calibration without human shards.
    ``held_by``: the job holding the folder's lease now, whose round this one would wait for (None: free).
    """
    models, _, _ = identify_models(captioner, filter_)
    reads = given_shards(shards)
    given = list(reads)
    ledger.check_out_folder(out, given)
    check_human(cfg, human)
    manifest = ledger.make_manifest(given, cfg, {role: m["hash"] for role, m in models.items()})
    ignore = (ledger.THRESHOLD,)  # set by the calibration, when there is one
    old, diff = ledger.check_rerun(out, manifest, ignore, new_run)
    clears = bool(diff)
    urls = ledger.grown_shards(out, old["shards"], given) if old is not None and not clears else given
    names = ledger.shard_names(urls)
    jobs, changed = (
        ([(u, names[u]) for u in urls], []) if clears else ledger.pending_shards(out, names, urls, reads)
    )
    gone = ledger.gone_inputs(jobs, given)
    left_out = set(gone)
    held = holder(out)
    return {
        "out": out,
        "shards": len(urls),
        "committed": len(urls) - len(jobs),
        "to_clean": [url for url, _ in jobs if url not in left_out],
        "inputs_changed": changed,
        "gone_shards": gone,
        "clears_run": clears,
        "held_by": {k: held[k] for k in ("host", "pid", "renewed")} if held else None,
    }
