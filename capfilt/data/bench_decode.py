"""Decode throughput: images per second (and per core) for one decoder on real shards.

Reading is done before the clock starts, and one batch warms the decoder up (thread pool, DALI
pipeline build), so the figure is decode + resize + normalise into the batch tensor that a round's models
get (``decode_batch``). Exposed as ``capfilt bench``.
"""

from __future__ import annotations

import io
import time
from collections import Counter

import torch
from PIL import Image

from capfilt.config import RunConfig
from capfilt.data.decode import make_decoder
from capfilt.data.reader import iter_shard
from capfilt.data.sample import Sample
from capfilt.data.specs import expand_shards


def bench_decode(
    shards: list[str],
    decoder: str = "pillow",
    image_size: int = 64,
    threads: int = 1,
    batch_size: int = 64,
    limit: int = 2000,
    repeats: int = 3,
    gpu: bool = False,
) -> dict:
    """Time ``decoder`` on up to ``limit`` samples of ``shards``; the best of ``repeats`` passes (DALI on
    the GPU, ``mixed``, when ``gpu``)."""
    samples = []
    for url in expand_shards(shards):
        samples += [s for s in iter_shard(url) if isinstance(s, Sample)]
        if len(samples) >= limit:
            break
    samples = samples[:limit]
    cfg = RunConfig(
        image_size=image_size,
        decoder=decoder,
        decode_threads=threads,
        batch_size=batch_size,
        num_gpus_per_actor=1.0 if gpu else 0.0,
    )
    with make_decoder(cfg) as dec:
        dec.decode_batch(samples[:batch_size])  # warm-up
        best = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            for i in range(0, len(samples), batch_size):
                dec.decode_batch(samples[i : i + batch_size])  # the batch a round gets
            if gpu:  # DALI mixed leaves its output on the GPU, the last copy perhaps still queued
                torch.cuda.synchronize()
            best = min(best, time.perf_counter() - start)
    sizes = Counter("{}x{}".format(*Image.open(io.BytesIO(s.image)).size) for s in samples)
    return {
        "decoder": decoder,
        "images": len(samples),
        "source_sizes": dict(sizes.most_common(3)),
        "image_size": image_size,
        "threads": threads,
        "batch_size": batch_size,
        "seconds": round(best, 4),
        "images_per_s": round(len(samples) / best, 1),
        "images_per_s_per_core": round(len(samples) / best / threads, 1),
    }
