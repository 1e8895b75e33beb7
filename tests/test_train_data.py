"""Training data: real tar fixtures, one pair per reference, determinism, rank split, resume skip."""

import io
import json
import tarfile
from collections import Counter

import numpy as np
import pytest
from PIL import Image

from capfilt.config import TrainConfig
from capfilt.train.data import PairBatches, count_pairs, random_resized_crop, read_pairs

COLORS = {"red": (220, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 220), "yellow": (230, 220, 30)}
SHAPES = ("square", "bar")


def scene(i: int) -> tuple[str, str, Image.Image]:
    """A learnable toy scene: a coloured square or bar on grey; its caption names both."""
    color, shape = list(COLORS)[i % 4], SHAPES[(i // 4) % 2]
    img = Image.new("RGB", (40, 40), (128, 128, 128))
    box = (8, 8, 32, 32) if shape == "square" else (4, 16, 36, 24)
    img.paste(COLORS[color], box)
    return color, shape, img


def make_shard(path, n: int, refs: int = 1, start: int = 0, bad: int = 0) -> str:
    """A real WebDataset tar: jpg + txt + json (json["captions"] with ``refs`` references when > 1)."""
    with tarfile.open(path, "w") as tar:

        def add(name, data):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))

        for i in range(start, start + n):
            color, shape, img = scene(i)
            buf = io.BytesIO()
            img.save(buf, "JPEG", quality=95)
            captions = [
                f"A {color} {shape}.",
                f"the {shape} is {color}",
                f"{color} {shape} on grey",
                f"a picture with a {color} {shape}",
                f"one {shape}, {color}",
            ][:refs]
            key = f"{i:06d}"
            add(f"{key}.jpg", buf.getvalue())
            add(f"{key}.txt", captions[0].encode())
            add(f"{key}.json", json.dumps({"captions": captions} if refs > 1 else {}).encode())
        for j in range(bad):  # a sample without an image: rejected by the reader
            add(f"bad{j:03d}.txt", b"no image here")
    return str(path)


@pytest.fixture
def shards(tmp_path):
    return [make_shard(tmp_path / "a.tar", 20, bad=1), make_shard(tmp_path / "b.tar", 12, refs=3, start=20)]


def test_one_pair_per_reference_and_rejects_counted(shards):
    rejects = Counter()
    pairs = list(read_pairs(shards, rejects))
    assert len(pairs) == 20 + 12 * 3 and rejects == {"missing_image": 1}
    assert pairs[0].caption == "a red square"  # normalised
    human = pairs[20:23]
    assert len({p.idx for p in human}) == 1 and human[0].idx != pairs[23].idx
    assert count_pairs(shards)[0] == 56


def test_epoch_order_is_a_function_of_seed_and_epoch(shards):
    stage = TrainConfig(image_size=16, batch_size=4, shuffle_buffer=8, seed=3)

    def captions(epoch, **kw):
        return [c for b in PairBatches(shards, stage, epoch, **kw) for c in b["captions"]]

    first = captions(0)
    assert first == captions(0) and first != captions(1)
    assert len(first) == 56
    batches = list(PairBatches(shards, stage, 0))
    resumed = list(PairBatches(shards, stage, 0, skip=5))
    assert [b["captions"] for b in resumed] == [b["captions"] for b in batches[5:]]
    assert all(np.array_equal(a["pixels"], b["pixels"]) for a, b in zip(resumed, batches[5:]))
    # two ranks split the pairs: disjoint halves, full batches only
    r0, r1 = captions(0, rank=0, world=2), captions(0, rank=1, world=2)
    assert len(r0) == len(r1) == 28 and sorted(r0 + r1) == sorted(first)


def test_random_resized_crop_shape_and_bounds():
    _, _, img = scene(0)
    rng = np.random.default_rng(0)
    out = [random_resized_crop(img, 16, (0.2, 1.0), rng) for _ in range(20)]
    assert all(o.size == (16, 16) for o in out)
    assert len({o.tobytes() for o in out}) > 1


def test_a_cleaned_shard_trains_on_every_kept_caption():
    """Round output: json["candidates"] with kept flags; BLIP pretrains on every kept caption."""
    from capfilt.train.data import references

    meta = {
        "caption": "a red square",
        "candidates": [
            {"text": "a red square", "source": "web", "kept": True},
            {"text": "a picture of a red square", "source": "synthetic", "kept": True},
            {"text": "click to enlarge", "source": "synthetic", "kept": False},
        ],
    }
    assert references(meta, "a red square") == ["a red square", "a picture of a red square"]
    assert references({"captions": ["x", "y"]}, "x") == ["x", "y"]
    assert references({}, "txt only") == ["txt only"]
