"""One shard through the round: read → decode → caption → score → select → write.

This is the unit of work, retry and resume; the local runner, the Ray actors and the worker processes
all call :func:`process_shard`, so distribution only decides where it runs. Reading and decoding run
in a thread ahead of the model (bounded queue), so the model does not wait on I/O. Each scored batch
goes straight to the shard's writer, which streams the kept samples into the uncommitted tar; the shard
becomes visible only when the whole of it is written (done marker last). So a worker holds a few
batches of images, whatever the size of its shards.

Errors are data: reader and decoder rejects, and samples on which the captioner or the filter raises,
become Rejects with a reason. A batch that raises is retried in halves, so one bad sample costs only
itself; a batch whose every sample raises alone too is a broken model or setting, not bad
data, and fails the shard (``ModelFailed``), which is then reported and retried by a rerun instead of
committed with every sample rejected. ``stats.check()`` (in = kept + dropped + rejected) runs before
anything is written.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch

from capfilt.config import Config
from capfilt.data import reader, writer
from capfilt.data.sample import Candidate, Reject, Sample, ScoredSample, ShardStats
from capfilt.run import faults, lease
from capfilt.run.prefetch import prefetch
from capfilt.stages.select import decide

PREFETCH_BATCHES = 2


class ModelFailed(RuntimeError):
    """Every sample of a batch raised in a model, alone as in the batch: the shard fails with this."""


@dataclass
class Batch:
    """Decoded samples ready for the model, with the rejects met while reading and decoding them."""

    samples: list[Sample] = field(default_factory=list)
    pixels: torch.Tensor | None = None
    rejects: list[Reject] = field(default_factory=list)
    n_in: int = 0
    seconds: float = 0.0  # read + decode time spent producing this batch


def decoded_batches(shard: reader.ShardReader, decoder: Any, batch_size: int) -> Iterator[Batch]:
    """Read the shard and decode it batch by batch; every record read is counted in ``n_in``.

    A batch's ``seconds`` is the time spent reading and decoding it, not the time the generator sat
    suspended after the previous one (behind a full read-ahead queue, that is the model's time).
    """
    pending: list[Sample] = []
    batch, t0 = Batch(), time.perf_counter()

    def flush() -> Batch:
        if pending:
            batch.pixels, kept, rejects = decoder.decode_batch(pending)
            batch.samples = [pending[i] for i in kept]
            batch.rejects += rejects
        batch.seconds = time.perf_counter() - t0
        pending.clear()
        return batch

    for record in shard:
        batch.n_in += 1
        if isinstance(record, Reject):
            batch.rejects.append(record)
            continue
        pending.append(record)
        if len(pending) == batch_size:
            yield flush()
            batch, t0 = Batch(), time.perf_counter()
    if pending or batch.n_in:
        yield flush()


def on_device(batches: Iterator[Batch], device: torch.device, dtype: torch.dtype) -> Iterator[Batch]:
    """Each batch's pixels moved to the models' device and dtype, once for both models. Run inside the
    read-ahead thread so the copy is off the model's thread; to a GPU from pinned memory, without
    waiting (a pageable float32 batch of 256 at 384 px is 453 MB, which the models copied twice).
    """
    for batch in batches:
        pixels = batch.pixels
        if pixels is not None and (pixels.device != device or pixels.dtype != dtype):
            if device.type == "cuda" and pixels.device.type == "cpu":
                pixels = pixels.pin_memory()
            batch.pixels = pixels.to(device, dtype, non_blocking=True)
        yield batch


@dataclass
class BatchLimit:
    """The most samples each model call may take at once, set when a batch runs out of memory: later
    batches go in parts that fit, instead of running out of memory again before their halves run. A worker
    keeps one across its shards, keyed by the stage ("encode", "caption", "score"); a limit is never raised
    again (memory another process frees is not taken back)."""

    sizes: dict[str, int] = field(default_factory=dict)

    def ran_out(self, stage: str, n: int, shard: str) -> None:
        """A batch of ``n`` ran out of memory: ``stage``'s calls take at most half of it from now on."""
        size = (n + 1) // 2
        if size < self.sizes.get(stage, n):
            self.sizes[stage] = size
            print(
                f"[capfilt] {shard}: {stage} ran out of memory at a batch of {n}; "
                f"its batches go in parts of at most {size} from now on",
                file=sys.stderr,
                flush=True,
            )


def guarded(
    fn: Callable[[torch.Tensor, list], list],
    pixels: torch.Tensor,
    args: list,
    samples: list[Sample],
    reason: str,
    stage: str,
    limit: BatchLimit,
) -> tuple[list[int], list, list[Reject]]:
    """``fn(pixels, args)`` on the batch, in parts of ``limit.sizes[stage]`` if one is set; a part that
    raises goes on in halves (:meth:`Retry.halves`), rejecting only the samples that raise alone.

    Returns the indices that succeeded, their outputs, and the rejects. The first part that raised is said
    on stderr: a batch too big for the GPU's memory would otherwise only show as a slow round. If every
    sample raises alone too, raises ``ModelFailed``.
    """
    errors: list[Exception] = []

    def say(err: Exception, n: int) -> None:
        if not errors:
            first = (str(err).splitlines() or [""])[0][:200]
            print(
                f"[capfilt] {samples[0].shard}: a batch of {n} raised {type(err).__name__}: {first} "
                f"({stage}); retrying it in halves",
                file=sys.stderr,
                flush=True,
            )
        errors.append(err)

    n, size = len(samples), limit.sizes.get(stage, len(samples))
    parts = [slice(i, min(i + size, n)) for i in range(0, n, size)]
    ok, outs, rejects = Retry(fn, reason, stage, limit).parts(pixels, args, samples, parts, say)
    if not ok:
        raise ModelFailed(
            f"every sample of a batch of {n} raised ({stage}), "
            f"alone too; the first: {rejects[0].detail.splitlines()[0][:200]}"
        ) from errors[0]
    return ok, outs, rejects


@dataclass
class Retry:
    """One model stage's calls on parts of a batch, a part that raises split in halves."""

    fn: Callable[[torch.Tensor, list], list]
    reason: str
    stage: str
    limit: BatchLimit

    def parts(
        self,
        pixels: torch.Tensor,
        args: list,
        samples: list[Sample],
        parts: list[slice],
        say: Callable[[Exception, int], None] | None = None,
    ) -> tuple[list[int], list, list[Reject]]:
        """``fn`` on each part; a part that raises goes on in halves. Indices are the batch's."""
        ok, outs, rejects = [], [], []
        for part in parts:
            try:
                got = list(range(part.stop - part.start)), self.fn(pixels[part], args[part]), []
            except Exception as err:
                if say:
                    say(err, part.stop - part.start)
                got = self.halves(pixels[part], args[part], samples[part], err)
            ok += [part.start + i for i in got[0]]
            outs += got[1]
            rejects += got[2]
        return ok, outs, rejects

    def halves(
        self, pixels: torch.Tensor, args: list, samples: list[Sample], err: Exception
    ) -> tuple[list[int], list, list[Reject]]:
        """A batch that raised ``err``, run again as two halves, a half that raises split in turn; a sample
        that raises alone is rejected with its own error. Why halves: one bad sample of 256 costs about
        16 calls instead of 256, and a batch too big for the GPU's memory goes on as halves instead of
        single images (and sets the limit for the batches after it)."""
        if isinstance(err, torch.OutOfMemoryError):
            self.limit.ran_out(self.stage, len(samples), samples[0].shard)
        if len(samples) == 1:
            key, shard = samples[0].key, samples[0].shard
            return [], [], [Reject(key, shard, self.reason, f"{type(err).__name__}: {err}")]
        mid = len(samples) // 2
        return self.parts(pixels, args, samples, [slice(0, mid), slice(mid, len(samples))])


def score_batch(
    batch: Batch,
    captioner: Any,
    filter_: Any,
    threshold: float,
    timings: dict[str, float],
    shared_vision: bool = False,
    limit: BatchLimit | None = None,
) -> tuple[list[ScoredSample], list[Reject]]:
    """Caption, score and select one decoded batch. With ``shared_vision`` (the two hold the same ViT:
    ``worker.same_vision``) each image is encoded once, and both models take its embeddings. ``limit``:
    the worker's, kept across batches (a fresh one if none)."""
    limit = limit or BatchLimit()
    samples, images = batch.samples, batch.pixels
    caption, score, rejects = captioner.caption, filter_.score, []
    t0 = time.perf_counter()
    if shared_vision:
        ok, rows, rejects = guarded(
            lambda px, _: list(captioner.encode(px)),
            images,
            samples,
            samples,
            "caption_failed",
            "encode",
            limit,
        )
        samples, images = [samples[i] for i in ok], torch.stack(rows)
        caption, score = captioner.caption_embeds, filter_.score_embeds
    ok, captions, failed = guarded(
        caption, images, [s.key for s in samples], samples, "caption_failed", "caption", limit
    )
    rejects += failed
    samples, images = [samples[i] for i in ok], images[ok]  # guarded raised if none is ok
    candidates = [  # an image without a web caption competes with its synthetic ones only
        ([Candidate(s.caption, "web")] if s.caption else []) + [Candidate(t, "synthetic") for t in caps]
        for s, caps in zip(samples, captions)
    ]
    t1 = time.perf_counter()
    ok, scores, failed = guarded(
        score, images, [[c.text for c in cs] for cs in candidates], samples, "score_failed", "score", limit
    )
    rejects += failed
    t2 = time.perf_counter()
    results = []
    for i, pairs in zip(ok, scores):
        for c, (itm, itc) in zip(candidates[i], pairs):
            c.itm, c.itc = itm, itc
        results.append(decide(samples[i], candidates[i], threshold))
    t3 = time.perf_counter()
    for name, dt in (("caption", t1 - t0), ("score", t2 - t1), ("select", t3 - t2)):
        timings[name] = timings.get(name, 0.0) + dt
    return results, rejects


def shard_stats(
    url: str, results: list[ScoredSample], rejects: list[Reject], n_in: int, truncated: bool
) -> ShardStats:
    """Count what happened to every record of the shard."""
    stats = ShardStats(shard=url, n_in=n_in, truncated=truncated)
    for r in rejects:
        stats.reject(r)
    count_results(stats, results)
    return stats


def count_results(stats: ShardStats, results: list[ScoredSample]) -> None:
    """Add scored samples to the shard's counts: kept or dropped, and candidates by source."""
    for res in results:
        stats.no_web_caption += not res.sample.caption
        if res.kept:
            stats.kept += 1
        else:
            stats.dropped += 1
        for c in res.candidates:
            stats.candidates_by_source[c.source] = stats.candidates_by_source.get(c.source, 0) + 1
            if c.kept:
                stats.kept_by_source[c.source] = stats.kept_by_source.get(c.source, 0) + 1


def process_shard(
    url: str,
    out_dir: str,
    captioner: Any,
    filter_: Any,
    decoder: Any,
    cfg: Config,
    provenance: dict[str, Any],
    name: str | None = None,
    device: torch.device | None = None,
    models: AbstractContextManager = nullcontext(),
    shared_vision: bool = False,
    limit: BatchLimit | None = None,
    owner: str | None = None,
) -> ShardStats:
    """Clean one shard into ``out_dir/NAME.*`` and return its stats (also written, with the done marker).

    ``name`` defaults to ``writer.output_name(url)``; the round passes the name it got from the whole
    shard list, so that two inputs with the same file name do not collide. ``device``: the models'; the
    read-ahead thread moves each batch there (in ``run.dtype``), so the models get it ready. ``models``
    is held while a batch is captioned and scored (a lock when other shards share the models); the time
    spent waiting for it is ``wait_models``. ``shared_vision``, ``limit``: see :func:`score_batch`.
    ``owner``: the round's lease, read just before the commit; once another job holds the folder the shard
    is not committed (``LeaseLost``). A worker can outlive its driver (a warm actor, a killed driver's
    in-flight shard) and must not commit beside the job that took the folder over.
    """
    limit = limit or BatchLimit()
    start = time.perf_counter()
    name = name or writer.output_name(url)

    def clean(shard: reader.ShardReader) -> ShardStats:  # read twice when not in key order (read_shard)
        stats = ShardStats(shard=shard.shard, unordered=shard.grouped)  # the URL without a signature
        timings = {"read_decode": 0.0, "wait_input": 0.0, "wait_models": 0.0, "write": 0.0}
        batches = decoded_batches(shard, decoder, cfg.run.batch_size)
        if device is not None:
            batches = on_device(batches, device, getattr(torch, cfg.run.dtype))
        batches = prefetch(batches, PREFETCH_BATCHES)
        with writer.RoundShardWriter(out_dir, name, provenance, cfg.run.parquet_image_bytes) as out:
            while True:
                t0 = time.perf_counter()
                batch = next(batches, None)
                timings["wait_input"] += time.perf_counter() - t0  # > 0 only when the model waited on I/O
                if batch is None:
                    break
                stats.n_in += batch.n_in
                for r in batch.rejects:
                    stats.reject(r)
                timings["read_decode"] += batch.seconds
                if batch.samples:
                    t0 = time.perf_counter()
                    with models:
                        timings["wait_models"] += time.perf_counter() - t0
                        done, failed = score_batch(
                            batch, captioner, filter_, cfg.filter.threshold, timings, shared_vision, limit
                        )
                    for r in failed:
                        stats.reject(r)
                    count_results(stats, done)
                    t0 = time.perf_counter()
                    out.add(done)
                    timings["write"] += time.perf_counter() - t0
                    faults.maybe_kill(name)
            stats.truncated, stats.input_sha256 = shard.truncated, shard.sha256  # known once it has finished
            stats.truncation_detail = shard.truncation_detail
            stats.input_version = shard.version
            stats.check()
            stats.timings = timings  # stats.json gets the timings up to the commit; the caller's copy all
            t0 = time.perf_counter()
            if owner is not None:
                lease.check_held(lease.lease_url(out_dir), owner)
            out.commit(stats)
            timings["write"] += time.perf_counter() - t0
        return stats

    stats = reader.read_shard(url, clean, fingerprint=True, caption_from=cfg.run.caption_from)
    stats.timings["total"] = time.perf_counter() - start
    return stats
