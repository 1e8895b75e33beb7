"""Training data: real tar fixtures, one pair per reference, determinism, rank split, resume skip."""

import io
import json
import tarfile
from collections import Counter
from itertools import islice

import numpy as np
import pytest
from conftest import scrambled
from PIL import Image

from capfilt.config import TrainConfig
from capfilt.data.writer import write_tar
from capfilt.model.tokenizer import count_words
from capfilt.train.data import PairBatches, count_pairs, epoch_loader, random_resized_crop, read_pairs

COLORS = {"red": (220, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 220), "yellow": (230, 220, 30)}
SHAPES = ("square", "bar")


def scene(i: int) -> tuple[str, str, Image.Image]:
    """A learnable toy scene: a coloured square or bar on grey; its caption names both."""
    color, shape = list(COLORS)[i % 4], SHAPES[(i // 4) % 2]
    img = Image.new("RGB", (40, 40), (128, 128, 128))
    box = (8, 8, 32, 32) if shape == "square" else (4, 16, 36, 24)
    img.paste(COLORS[color], box)
    img.putpixel((0, 0), (i % 256, i // 256, 0))  # every sample its own picture (image ids are by bytes)
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
    assert count_pairs(shards).n_pairs == 56


def test_the_count_names_the_shards_that_ended_early_and_why(shards, tmp_path):
    """A file that is no tar (img2dataset's Parquet beside its shards, given by name) trained on nothing,
    and the count said only "0 pairs, rejected {}"; now it names the file and why, as a round does."""
    (tmp_path / "00000.parquet").write_bytes(b"PAR1" + bytes(600))
    counted = count_pairs([*shards, str(tmp_path / "00000.parquet")])
    assert counted.n_pairs == 56 and counted.empty == [str(tmp_path / "00000.parquet")]
    assert list(counted.ended_early) == [str(tmp_path / "00000.parquet")]
    assert (
        f"1 ended early ({tmp_path / '00000.parquet'}: not a tar archive but a Parquet file: it starts with b'PAR1"
        in str(counted)
    )


def test_samples_of_one_picture_share_their_image_id(tmp_path):
    """img2dataset writes COCO as one sample per caption. The id was by key before, so a finetuned
    filter's ITC took the picture's other captions as negatives and ITM could draw them as hard
    negatives; the id is of the image bytes now, whatever the keys and shards."""
    pictures = [scene(i)[2] for i in range(2)]
    jpgs = []
    for img in pictures:
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=95)
        jpgs.append(buf.getvalue())
    rows = [("000000000", 0, "a red square"), ("000000001", 0, "red square"), ("000000002", 1, "a green one")]
    for name, part in (("0", rows[:2]), ("1", rows[2:] + [("000000003", 0, "the red square")])):
        members = [m for k, j, t in part for m in ((f"{k}.jpg", jpgs[j]), (f"{k}.txt", t.encode()))]
        write_tar(str(tmp_path / f"{name}.tar"), members)
    pairs = list(read_pairs([str(tmp_path / "0.tar"), str(tmp_path / "1.tar")]))
    assert [p.caption for p in pairs] == ["a red square", "red square", "a green one", "the red square"]
    assert pairs[0].idx == pairs[1].idx == pairs[3].idx != pairs[2].idx


def test_json_captions_that_are_not_a_list_of_strings(tmp_path):
    """A corpus whose json "captions" is one string trained on each of its letters as a caption before
    (``a dog``: four pairs ``a``, ``d``, ``o``, ``g``); a list's other entries are left out."""
    _, _, img = scene(0)
    buf = io.BytesIO()
    img.save(buf, "JPEG")
    url = str(tmp_path / "odd.tar")
    write_tar(
        url,
        [
            ("a.jpg", buf.getvalue()),
            ("a.json", b'{"captions": "a dog"}'),
            ("a.txt", b"a dog on grass"),
            ("b.jpg", buf.getvalue()),
            ("b.json", b'{"captions": [{"caption": "x"}, "a red bar"]}'),
        ],
    )
    assert [p.caption for p in read_pairs([url])] == ["a dog on grass", "a red bar"]


def test_images_without_a_caption_are_counted_apart_from_bad_text(tmp_path):
    """img2dataset writes an empty txt for a page without alt-text: training counted those as bad_text,
    which reads as a corpus whose captions are broken."""
    _, _, img = scene(0)
    buf = io.BytesIO()
    img.save(buf, "JPEG")
    url = str(tmp_path / "alt.tar")
    write_tar(url, [("a.jpg", buf.getvalue()), ("a.txt", b""), ("b.jpg", buf.getvalue()), ("b.txt", b"!!")])
    rejects = Counter()
    assert list(read_pairs([url], rejects)) == [] and rejects == {"no_caption": 1, "bad_text": 1}


def test_the_count_pass_counts_the_words_of_every_pair_it_counts(shards):
    """A tokenizer trained on the corpus needs its word counts, not its captions: the same vocabulary."""
    words = Counter()
    counted = count_pairs(shards, words)
    captions = [p.caption for p in read_pairs(shards)]
    assert counted.n_pairs == len(captions) and words == count_words(captions)
    assert words["square"] == sum(c.split().count("square") for c in captions) > 0


def test_shards_tarred_from_a_folder_train_on_every_pair(tmp_path, shards):
    """``tar -cf`` of a folder lists its files in the folder's hash order. Before, each part of a sample was
    read on its own: these shards counted 2 pairs of 56, and finetuning on them stopped with a traceback
    from the schedule. Now the count finds them out of key order and every reader reads them grouped."""
    (tmp_path / "hashed").mkdir()
    hashed = [str(tmp_path / "hashed" / name) for name in ("a.tar", "b.tar")]  # the same names: image ids
    for src, dst in zip(shards, hashed):
        scrambled(src, dst)
    counted = count_pairs(hashed)
    assert (counted.n_pairs, counted.rejects, counted.unordered) == (56, {"missing_image": 1}, hashed)
    assert count_pairs(shards).unordered == [] and "2 not in key order" in str(counted)
    stage = TrainConfig(image_size=16, batch_size=4, shuffle_buffer=8, seed=3)

    def pairs(urls, unordered=()):
        batches = islice(PairBatches(urls, stage, 0, unordered=unordered), 14)
        return sorted((i, c) for b in batches for i, c in zip(b["idx"].tolist(), b["captions"]))

    assert pairs(hashed, counted.unordered) == pairs(shards) and len(pairs(shards)) == 56


def test_epoch_order_is_a_function_of_seed_and_epoch(shards):
    stage = TrainConfig(image_size=16, batch_size=4, shuffle_buffer=8, seed=3)

    def batches(epoch, n=14, **kw):  # the stream is endless; the loop takes steps_per_epoch batches
        return list(islice(PairBatches(shards, stage, epoch, **kw), n))

    def captions(epoch, **kw):
        return [c for b in batches(epoch, **kw) for c in b["captions"]]

    first = captions(0)
    assert first == captions(0) and first != captions(1)
    assert sorted(first) == sorted(p.caption for p in read_pairs(shards))  # 56 pairs: one pass
    resumed = batches(0, n=9, skip=5)
    assert [b["captions"] for b in resumed] == [b["captions"] for b in batches(0)[5:]]
    assert all(np.array_equal(a["pixels"], b["pixels"]) for a, b in zip(resumed, batches(0)[5:]))
    # more ranks than shards: each reads them all and keeps its 4th pair; still disjoint
    ranks = [
        {(i, c) for b in batches(0, n=3, rank=r, world=4) for i, c in zip(b["idx"].tolist(), b["captions"])}
        for r in range(4)
    ]
    assert len(set().union(*ranks)) == sum(map(len, ranks)) == 48


def test_ranks_and_workers_read_disjoint_shards_and_see_each_pair_once(tmp_path):
    """2 DDP ranks x 2 DataLoader workers: each reader reads its own shard; the epoch covers every pair."""
    shards = [make_shard(tmp_path / f"s{i}.tar", 8, start=8 * i) for i in range(4)]
    shard_of = {p.idx: url for url in shards for p in read_pairs([url])}
    stage = TrainConfig(image_size=16, batch_size=4, shuffle_buffer=4, seed=5)
    steps = count_pairs(shards).n_pairs // (stage.batch_size * 2)  # the loop's steps_per_epoch
    seen, read_by = [], {}
    for rank in range(2):
        loader = epoch_loader(shards, stage, epoch=0, rank=rank, world=2, num_workers=2)
        for b, batch in enumerate(islice(loader, steps)):
            ids = batch["idx"].tolist()
            seen += ids
            for url in {shard_of[i] for i in ids}:
                read_by.setdefault(url, set()).add((rank, b % 2))  # the DataLoader takes workers in turn
    assert all(len(readers) == 1 for readers in read_by.values()) and len(read_by) == 4
    assert len({r for readers in read_by.values() for r in readers}) == 4  # four readers, one shard each
    assert sorted(seen) == sorted(shard_of) and len(seen) == 32  # every pair once
    again = epoch_loader(shards, stage, epoch=0, rank=1, world=2, num_workers=2)
    assert [b["idx"].tolist() for b in islice(again, steps)] == [
        b["idx"].tolist() for b in islice(epoch_loader(shards, stage, 0, 1, 2, num_workers=2), steps)
    ]
    # a resumed rank (skip 3 batches) continues exactly where the uninterrupted one was
    whole = [b["idx"].tolist() for b in islice(epoch_loader(shards, stage, 0, 0, 2, num_workers=2), steps)]
    resumed = epoch_loader(shards, stage, 0, 0, 2, skip=3, num_workers=2)
    resumed = [b["idx"].tolist() for b in islice(resumed, steps - 3)]
    assert resumed[: steps - 3] == whole[3:]


def test_a_reader_with_fewer_pairs_starts_its_shards_again(tmp_path):
    """Unequal shards: the rank with 4 pairs gives its 3 batches too (DDP would wait forever otherwise)."""
    shards = [make_shard(tmp_path / "a.tar", 4), make_shard(tmp_path / "b.tar", 12, start=4)]
    small = {p.idx for p in read_pairs(shards[:1])}
    stage = TrainConfig(image_size=16, batch_size=4, shuffle_buffer=4, seed=0)
    ranks = [[set(b["idx"].tolist()) for b in islice(PairBatches(shards, stage, 0, r, 2), 3)] for r in (0, 1)]
    assert all(len(batches) == 3 for batches in ranks)
    assert [small] * 3 in ranks  # its one shard, three times


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
    # CLIP_benchmark's retrieval shards: a sample per image, its captions one per line of its txt
    assert references({}, "a cat\r\n the cat \n\n") == ["a cat", "the cat"] and references({}, " ") == []
    assert references(meta, "a red square\nclick to enlarge") == references(meta, "a red square")
