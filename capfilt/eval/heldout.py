"""The held-out test split in memory: images preprocessed as the round does, with their references.

Test shards carry every reference in ``json["captions"]`` (``txt`` is the first), or one per line of
``txt`` (CLIP_benchmark's retrieval sets). A split may instead hold one sample per caption, as
img2dataset writes COCO (one row per caption in its URL list): samples with the same image bytes are one
image, their captions its references. Images go through the round's own inference decoder (bicubic
resize to a square, no crop), so eval sees what a round sees, and are held as uint8 until a batch
is taken (``data.decode.Planes``).
"""

from __future__ import annotations

import functools
from collections import Counter
from collections.abc import Collection
from dataclasses import dataclass, field
from typing import NamedTuple

import torch

from capfilt.config import RunConfig
from capfilt.data.decode import Planes, pillow_rgb, to_planes
from capfilt.data.reader import ShardReader, read_shard
from capfilt.data.sample import Reject, Sample, caption_lines, image_id, listed_captions


@dataclass
class HeldOut:
    """``pixels[i]`` is image ``keys[i]`` (its first sample's key), normalised as a round's are, and
    ``references[i]`` its captions.

    Every sample read is one of: an image, one of ``joined`` (an image read before under another key: its
    captions joined that image's references), or a reject by reason (``no_caption`` among them).
    ``ended_early``: the shards that ended before their end-of-archive marker, with why (a file that is
    no tar at all among them), as a round reports them.
    """

    keys: list[str]
    pixels: Planes
    references: list[list[str]]
    rejects: Counter = field(default_factory=Counter)
    joined: int = 0
    ended_early: dict[str, str] = field(default_factory=dict)


class _Read(NamedTuple):
    """One captioned sample of a shard; ``pixels`` (uint8 3×S×S) is None when its image was read before."""

    image: int  # data.sample.image_id
    key: str
    pixels: torch.Tensor | None
    references: list[str]


def load_heldout(shards: list[str], run: RunConfig, limit: int | None = None) -> HeldOut:
    """Every decodable image with a caption at ``run.image_size`` (the first ``limit`` images when given);
    rejects and images without a caption (``no_caption``) are counted, not fatal."""
    index: dict[int, int] = {}  # image id → its place in the split
    keys, tensors, refs, rejects, joined, ended = [], [], [], Counter(), 0, {}
    for url in shards:
        if len(keys) == limit:
            break
        load = functools.partial(_load, run=run, limit=limit, known=index.keys())
        reads, shard_rejects, shard_ended = read_shard(url, load)  # once, however the shard is read
        rejects += shard_rejects
        ended |= shard_ended
        for read in reads:
            if read.image in index:
                refs[index[read.image]] += read.references
                joined += 1
                continue
            index[read.image] = len(keys)
            keys.append(read.key)
            tensors.append(read.pixels)
            refs.append(read.references)
    size = run.image_size
    pixels = torch.stack(tensors) if tensors else torch.empty(0, 3, size, size, dtype=torch.uint8)
    return HeldOut(keys, Planes(pixels), refs, rejects, joined, ended)


def _load(
    shard: ShardReader, run: RunConfig, limit: int | None, known: Collection[int]
) -> tuple[list[_Read], Counter, dict[str, str]]:
    """One shard's captioned samples, each image decoded once (``known``: the ids of earlier shards'
    images), up to the split's ``limit``-th image; its rejects; and why it ended early, if it did."""
    reads, rejects, new = [], Counter(), set()
    for item in shard:
        if isinstance(item, Reject):
            rejects[item.reason] += 1
            continue
        if not (texts := references(item)):  # nothing to test it against
            rejects["no_caption"] += 1
            continue
        image = image_id(item.image)
        if image in known or image in new:
            reads.append(_Read(image, item.key, None, texts))
            continue
        if len(known) + len(new) == limit:
            break
        rgb = pillow_rgb(item, run.image_size, run.max_pixels)
        if isinstance(rgb, Reject):
            rejects[rgb.reason] += 1
            continue
        new.add(image)
        reads.append(_Read(image, item.key, torch.from_numpy(to_planes(rgb)), texts))
    return reads, rejects, shard.ended_early


def references(sample: Sample) -> list[str]:
    """A held-out image's captions: json["captions"], else the lines of its caption; blank ones left out."""
    listed = listed_captions(sample.meta)
    return [t for t in listed if t.strip()] if listed else caption_lines(sample.caption)
