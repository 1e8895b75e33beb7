"""The held-out test split in memory: images preprocessed as the round does, with their references.

Test shards carry every reference in ``json["captions"]`` (``txt`` is the first). Images go through the
round's own inference decoder (bicubic resize to a square, no crop), so eval sees what a round sees.
"""

from __future__ import annotations

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
    held = HeldOut([], torch.empty(0, 3, run.image_size, run.image_size), [])
    tensors: list[torch.Tensor] = []
    for url in shards:
        if len(held.keys) == limit:
            break
        part = read_shard(
            url, lambda shard: _load(shard, run, None if limit is None else limit - len(held.keys))
        )
        tensors += part.tensors
        held.keys += part.keys
        held.references += part.references
        held.meta += part.meta
        held.rejects.update(part.rejects)
    if tensors:
        held.pixels = torch.stack(tensors)
    return held


@dataclass
class _Part:
    """One shard's part of ``load_heldout``: returned rather than added, so that a shard read a second
    time (not in key order) is loaded once."""

    keys: list[str] = field(default_factory=list)
    tensors: list[torch.Tensor] = field(default_factory=list)
    references: list[list[str]] = field(default_factory=list)
    meta: list[dict] = field(default_factory=list)
    rejects: Counter = field(default_factory=Counter)


def _load(shard: ShardReader, run: RunConfig, limit: int | None) -> _Part:
    part = _Part()
    for item in shard:
        if len(part.keys) == limit:
            break
        if isinstance(item, Sample) and not (refs := references(item)):  # nothing to test it against
            part.rejects["no_caption"] += 1
            continue
        pixels = item if isinstance(item, Reject) else pillow_decode(item, run.image_size, run.max_pixels)
        if isinstance(pixels, Reject):
            part.rejects[pixels.reason] += 1
            continue
        part.tensors.append(pixels)
        part.keys.append(item.key)
        part.references.append(refs)
        part.meta.append(item.meta)
    return part


def references(sample: Sample) -> list[str]:
    """A held-out image's captions: json["captions"], else its web caption; blank ones left out."""
    return [t for t in listed_captions(sample.meta) or [sample.caption] if t.strip()]
