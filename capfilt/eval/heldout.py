"""The held-out test split in memory: images preprocessed as the round does, with their references.

Test shards carry every reference in ``json["captions"]`` (``txt`` is the first). Images go through the
round's own inference decoder (bicubic resize to a square, no crop), so eval sees what a round sees.
"""

from __future__ import annotations

import functools
from collections import Counter
from dataclasses import dataclass, field

import torch

from capfilt.config import RunConfig
from capfilt.data.decode import pillow_decode
from capfilt.data.reader import ShardReader, read_shard
from capfilt.data.sample import Reject, Sample, listed_captions


@dataclass
class HeldOut:
    """``pixels[i]`` is image ``keys[i]``; ``references[i]`` its captions; ``meta[i]`` its json."""

    keys: list[str]
    pixels: torch.Tensor
    references: list[list[str]]
    meta: list[dict] = field(default_factory=list)
    rejects: Counter = field(default_factory=Counter)


def load_heldout(shards: list[str], run: RunConfig, limit: int | None = None) -> HeldOut:
    """Every decodable image with a caption at ``run.image_size`` (the first ``limit`` when given); rejects
    and images without a caption (``no_caption``) are counted, not fatal."""
    parts: list[HeldOut] = []
    for url in shards:
        left = None if limit is None else limit - sum(len(p.keys) for p in parts)
        if left == 0:
            break
        parts.append(read_shard(url, functools.partial(_load, run=run, limit=left)))  # once, however read
    return HeldOut(
        [k for p in parts for k in p.keys],
        torch.cat([p.pixels for p in parts]) if parts else _pixels([], run),
        [r for p in parts for r in p.references],
        [m for p in parts for m in p.meta],
        sum((p.rejects for p in parts), Counter()),
    )


def _load(shard: ShardReader, run: RunConfig, limit: int | None) -> HeldOut:
    """One shard's part of ``load_heldout``."""
    keys, tensors, refs, meta, rejects = [], [], [], [], Counter()
    for item in shard:
        if len(keys) == limit:
            break
        if isinstance(item, Sample) and not (texts := references(item)):  # nothing to test it against
            rejects["no_caption"] += 1
            continue
        pixels = item if isinstance(item, Reject) else pillow_decode(item, run.image_size, run.max_pixels)
        if isinstance(pixels, Reject):
            rejects[pixels.reason] += 1
            continue
        tensors.append(pixels)
        keys.append(item.key)
        refs.append(texts)
        meta.append(item.meta)
    return HeldOut(keys, _pixels(tensors, run), refs, meta, rejects)


def _pixels(tensors: list[torch.Tensor], run: RunConfig) -> torch.Tensor:
    return torch.stack(tensors) if tensors else torch.empty(0, 3, run.image_size, run.image_size)


def references(sample: Sample) -> list[str]:
    """A held-out image's captions: json["captions"], else its web caption; blank ones left out."""
    return [t for t in listed_captions(sample.meta) or [sample.caption] if t.strip()]
