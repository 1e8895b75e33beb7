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
from capfilt.data.reader import iter_shard
from capfilt.data.sample import Reject


@dataclass
class HeldOut:
    """``pixels[i]`` is image ``keys[i]``; ``references[i]`` its captions; ``meta[i]`` its json."""

    keys: list[str]
    pixels: torch.Tensor
    references: list[list[str]]
    meta: list[dict] = field(default_factory=list)
    rejects: Counter = field(default_factory=Counter)


def load_heldout(shards: list[str], run: RunConfig, limit: int | None = None) -> HeldOut:
    """Every decodable image at ``run.image_size`` (the first ``limit`` when given); rejects are counted,
    not fatal."""
    keys, tensors, refs, meta, rejects = [], [], [], [], Counter()
    for item in (item for url in shards for item in iter_shard(url)):
        if len(keys) == limit:
            break
        pixels = item if isinstance(item, Reject) else pillow_decode(item, run.image_size, run.max_pixels)
        if isinstance(pixels, Reject):
            rejects[pixels.reason] += 1
            continue
        tensors.append(pixels)
        keys.append(item.key)
        refs.append(list(item.meta.get("captions") or [item.caption]))
        meta.append(item.meta)
    pixels = torch.stack(tensors) if tensors else torch.empty(0, 3, run.image_size, run.image_size)
    return HeldOut(keys, pixels, refs, meta, rejects)
