"""Training pairs from WebDataset shards: read → one pair per reference → shuffle → augment → batch.

An epoch's order is a pure function of (seed, epoch) for a given number of ranks and DataLoader
workers, and every random crop of (seed, epoch, rank, batch,
slot). That is what lets a resumed run skip the batches it already trained on and then see exactly the
batches an uninterrupted run would: no RNG state has to be saved.

No torchvision on CPU here, so BLIP's train augmentation (RandomResizedCrop, bicubic, horizontal flip) is
written out with Pillow and numpy below. RandAugment(2, 5) is left out: the demo world's captions name
colours and positions, which colour jitter and shears would falsify.
"""

from __future__ import annotations

import math
import warnings
from collections import Counter
from collections.abc import Collection, Iterable, Iterator
from dataclasses import dataclass, field
from itertools import count, islice

import numpy as np
import torch
from PIL import Image, ImageOps
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from capfilt.config import RunConfig, TrainConfig
from capfilt.data.decode import normalize, open_checked, to_rgb
from capfilt.data.reader import ShardReader, read_shard
from capfilt.data.sample import Reject, Sample, caption_lines, image_id, listed_captions
from capfilt.model.tokenizer import count_words, normalize_caption

MAX_PIXELS = RunConfig.max_pixels  # the round's decompression-bomb limit


@dataclass
class Pair:
    """One (image, caption) training pair; ``idx`` (``image_id``) is the same for every caption of one
    image, whichever samples they came in."""

    sample: Sample
    caption: str
    idx: int


def references(meta: dict, caption: str) -> list[str]:
    """The captions a sample trains on: json["captions"] (human and test shards), else every caption a
    CapFilt round kept (json["candidates"], web and synthetic alike, as BLIP pretrains on), else the
    lines of its caption (``caption_lines``)."""
    kept = [c["text"] for c in meta.get("candidates", []) if c.get("kept")]
    return listed_captions(meta) or kept or caption_lines(caption)


def read_pairs(
    shards: Iterable[str], rejects: Counter | None = None, unordered: Collection[str] = ()
) -> Iterator[Pair]:
    """Every usable pair of the shards, in order: one per reference (see ``references``). The shards in
    ``unordered`` (``PairCount.unordered``) are read grouped by key (``data.reader``).

    Rejected samples are skipped and counted by reason in ``rejects``; so are images without a caption
    (``no_caption``: img2dataset's pages without alt-text) and captions that normalise to nothing
    (``bad_text``).
    """
    rejects = Counter() if rejects is None else rejects
    for url in shards:
        yield from shard_pairs(ShardReader(url, grouped=url in unordered), rejects)


def shard_pairs(shard: ShardReader, rejects: Counter) -> Iterator[Pair]:
    """One shard's pairs (``read_pairs``)."""
    for item in shard:
        if isinstance(item, Reject):
            rejects[item.reason] += 1
            continue
        refs = references(item.meta, item.caption)
        if not refs:
            rejects["no_caption"] += 1
        idx = image_id(item.image)
        for ref in refs:
            text = normalize_caption(ref)
            if text:
                yield Pair(item, text, idx)
            else:
                rejects["bad_text" if ref.strip() else "no_caption"] += 1


def shuffled(items: Iterable, buffer: int, rng: np.random.Generator) -> Iterator:
    """WebDataset-style shuffle: keep ``buffer`` items, emit a random one as each new item arrives."""
    pool: list = []
    for item in items:
        if len(pool) < buffer:
            pool.append(item)
            continue
        j = int(rng.integers(len(pool)))
        pool[j], item = item, pool[j]
        yield item
    rng.shuffle(pool)
    yield from pool


def random_resized_crop(
    img: Image.Image, size: int, scale: tuple[float, float], rng: np.random.Generator
) -> Image.Image:
    """torchvision's RandomResizedCrop (ratio 3/4..4/3, 10 tries, then a centre crop), bicubic."""
    width, height = img.size
    area = width * height
    for _ in range(10):
        target = area * rng.uniform(*scale)
        ratio = math.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3)))
        w, h = round(math.sqrt(target * ratio)), round(math.sqrt(target / ratio))
        if 0 < w <= width and 0 < h <= height:
            top, left = int(rng.integers(height - h + 1)), int(rng.integers(width - w + 1))
            break
    else:
        w, h = min(width, height), min(width, height)
        top, left = (height - h) // 2, (width - w) // 2
    return img.resize((size, size), Image.BICUBIC, box=(left, top, left + w, top + h))


def decode_rgb(sample: Sample) -> Image.Image | Reject:
    """Full-resolution RGB (the crop needs it), with the inference decoder's checks and mode rules."""
    im = open_checked(sample, MAX_PIXELS)
    if isinstance(im, Reject):
        return im
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            im = to_rgb(ImageOps.exif_transpose(im))
            im.load()
            return im
    except (OSError, ValueError, SyntaxError, EOFError) as err:
        return Reject(sample.key, sample.shard, "undecodable_image", f"{type(err).__name__}: {err}")


def decoded(pairs: Iterable[Pair], rejects: Counter) -> Iterator[tuple[Image.Image, Pair]]:
    """Pairs with their decoded image; undecodable ones are counted and skipped (before batching, so
    batches stay full and their boundaries stay a function of the data)."""
    for pair in pairs:
        im = decode_rgb(pair.sample)
        if isinstance(im, Reject):
            rejects[im.reason] += 1
        else:
            yield im, pair


def augment(img: Image.Image, stage: TrainConfig, rng: np.random.Generator) -> torch.Tensor:
    """The train augmentation of one stage (size, crop scale, flip), then BLIP's normalisation."""
    img = random_resized_crop(img, stage.image_size, stage.crop_scale, rng)
    if stage.hflip and rng.random() < 0.5:
        img = img.transpose(Image.FLIP_LEFT_RIGHT)
    return normalize(np.asarray(img))


def reader_split(
    shards: list[str], seed: int, epoch: int, reader: int, readers: int
) -> tuple[list[str], int]:
    """What one reader (a DDP rank's DataLoader worker) reads in an epoch: (shards, pair stride).

    Every ``readers``-th shard of the epoch's (seed, epoch) permutation, as webdataset's node and worker
    splitting do (stride 1); with fewer shards than readers, all shards and every ``readers``-th pair.
    """
    order = [shards[i] for i in np.random.default_rng([seed, epoch]).permutation(len(shards))]
    return (order[reader::readers], 1) if len(order) >= readers else (order, readers)


def passes(
    shards: list[str],
    buffer: int,
    rng: np.random.Generator,
    rejects: Counter,
    unordered: Collection[str] = (),
) -> Iterator[Pair]:
    """The shards' pairs, shuffled, pass after pass: a reader whose shards hold fewer pairs than its
    share of the epoch starts them again (DistributedSampler pads the same way) instead of stalling DDP."""
    while True:
        empty = True
        for pair in shuffled(read_pairs(shards, rejects, unordered), buffer, rng):
            empty = False
            yield pair
        if empty:
            return


class PairBatches(IterableDataset):
    """The batches of one epoch for one DDP rank, from batch ``skip`` on; endless (the loop takes
    ``steps_per_epoch``).

    Each rank, and each of its DataLoader workers, reads only its own shards (:func:`reader_split`), so
    reading does not grow with the number of ranks. The rank's batch ``b`` is reader part ``b % workers``'s
    batch ``b // workers`` (the DataLoader takes workers in turn). When shards hold equal numbers of pairs
    and the batch size divides them, every pair is seen once per epoch across ranks; otherwise a reader
    with fewer pairs repeats some and one with more does not reach its last ones this epoch.
    """

    def __init__(
        self,
        shards: list[str],
        stage: TrainConfig,
        epoch: int,
        rank: int = 0,
        world: int = 1,
        skip: int = 0,
        unordered: Collection[str] = (),
    ):
        self.shards, self.stage, self.epoch = shards, stage, epoch
        self.rank, self.world, self.skip = rank, world, skip
        self.unordered = frozenset(unordered)  # read grouped by key (PairCount.unordered)
        self.rejects: Counter = Counter()

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        worker, n_workers = (info.id, info.num_workers) if info else (0, 1)
        seed, bs = self.stage.seed, self.stage.batch_size
        # The DataLoader starts with worker 0, which must make batch ``skip``: it plays that batch's part.
        part = (worker + self.skip) % n_workers
        reader = self.rank * n_workers + part
        shards, stride = reader_split(self.shards, seed, self.epoch, reader, self.world * n_workers)
        rng = np.random.default_rng([seed, self.epoch] + ([reader] if stride == 1 else []))
        stream = passes(shards, self.stage.shuffle_buffer, rng, self.rejects, self.unordered)
        mine = decoded(islice(stream, reader % stride, None, stride), self.rejects)
        first = -(-(self.skip - part) // n_workers)  # this part's batches trained on before a resume
        for _ in islice(mine, bs * first):
            pass
        for b in count(first * n_workers + part, n_workers):
            pairs = list(islice(mine, bs))
            if len(pairs) < bs:
                return
            crops = [
                augment(im, self.stage, np.random.default_rng([seed, self.epoch, self.rank, b, j]))
                for j, (im, _) in enumerate(pairs)
            ]
            yield {
                "pixels": torch.stack(crops),
                "captions": [p.caption for _, p in pairs],
                "idx": torch.tensor([p.idx for _, p in pairs], dtype=torch.long),
            }


def epoch_loader(*args, num_workers: int = 0, **kwargs) -> DataLoader:
    """A DataLoader over ``PairBatches(*args, **kwargs)`` (already batched, so ``batch_size=None``)."""
    return DataLoader(PairBatches(*args, **kwargs), batch_size=None, num_workers=num_workers)


@dataclass
class PairCount:
    """What one counting pass over the training shards found."""

    n_pairs: int  # pairs per epoch, for the schedule
    rejects: Counter
    shards: list[str]  # the shards that hold a pair, in the given order: the ones to train on
    empty: list[str]  # the others (a cleaned shard whose every caption was dropped)
    unordered: list[str] = field(default_factory=list)  # shards whose keys' files stand apart: read grouped
    ended_early: dict[str, str] = field(default_factory=dict)  # shards cut or no tar at all: why

    def __str__(self) -> str:
        left_out = f" ({len(self.empty)} without a pair left out)" if self.empty else ""
        grouped = f", {len(self.unordered)} not in key order, read grouped by key" if self.unordered else ""
        ended = ""
        if self.ended_early:
            url, why = next(iter(self.ended_early.items()))
            more = f" and {len(self.ended_early) - 1} more" if len(self.ended_early) > 1 else ""
            ended = f", {len(self.ended_early)} ended early ({url}: {why}{more})"
        return (
            f"{len(self.shards)} shards{left_out}, {self.n_pairs} pairs, rejected {dict(self.rejects)}"
            f"{grouped}{ended}"
        )


def count_pairs(shards: list[str], words: Counter | None = None) -> PairCount:
    """One pass reading image headers only: pairs per epoch, rejects, non-empty shards, the shards not in
    key order and those that ended early; with ``words``, each pair's caption is counted into it
    (``count_words``), for a tokenizer trained on the corpus.

    The schedule is built on this count, so images whose header already fails are left out here too.
    Training takes only the shards that hold a pair: with several ranks, each reads only its own shards
    (``reader_split``), and a rank given only empty ones would have nothing to train on. Nothing kept
    here grows with the number of pairs (``words`` grows with the distinct words).
    """
    total = PairCount(0, Counter(), [], [])
    for url in shards:
        n, rejects, shard_words, grouped, ended = read_shard(
            url, lambda shard: _count(shard, words is not None)
        )
        total.n_pairs += n
        total.ended_early |= ended
        total.rejects.update(rejects)
        (total.shards if n else total.empty).append(url)
        if grouped:
            total.unordered.append(url)
        if words is not None:
            words.update(shard_words)
    return total


def _count(shard: ShardReader, with_words: bool) -> tuple[int, Counter, Counter, bool, dict[str, str]]:
    """One shard's part of ``count_pairs``, returned rather than added, so that a shard read a second
    time (not in key order) is counted once."""
    n, rejects, words = 0, Counter(), Counter()
    for pair in shard_pairs(shard, rejects):
        checked = open_checked(pair.sample, MAX_PIXELS)
        if isinstance(checked, Reject):
            rejects[checked.reason] += 1
        else:
            n += 1
            if with_words:
                count_words([pair.caption], words)
    return n, rejects, words, shard.grouped, shard.ended_early
