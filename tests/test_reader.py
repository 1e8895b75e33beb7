"""Reading shards: grouping, every per-sample reject, truncation, img2dataset layout, long names."""

from __future__ import annotations

import bz2
import gzip
import hashlib
import io
import json
import lzma
import random
import tarfile
import zipfile
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from conftest import bad_shard_members, encode, make_sample, scrambled, smooth_image

from capfilt.config import RunConfig
from capfilt.data import sample as sample_module
from capfilt.data.inspect import inspect_input
from capfilt.data.reader import NotInKeyOrder, ShardReader, iter_shard, parse_header, read_shard, split_key
from capfilt.data.sample import Reject, Sample
from capfilt.data.specs import expand_shards
from capfilt.data.writer import output_name, write_samples_shard, write_tar
from capfilt.errors import UserError
from capfilt.eval.heldout import load_heldout
from capfilt.run.progress import input_notes


def test_split_key_follows_webdataset():
    assert split_key("a/b/0001.seg.JPG") == ("a/b/0001", "seg.jpg")
    assert split_key("0001.txt") == ("0001", "txt")
    assert split_key("README") is None


def test_a_dotted_key_says_why_its_image_is_missing(tmp_path):
    url = str(tmp_path / "dots.tar")
    write_tar(url, [("img.0001.jpg", encode(smooth_image())), ("img.0001.txt", b"a cat"), ("ok.jpg", b"x")])
    reject = next(iter(ShardReader(url)))
    assert (reject.key, reject.reason) == ("img", "missing_image")
    assert "img.0001.jpg is key 'img' with extension '0001.jpg'" in reject.detail
    plain = [("cat.txt", b"a cat")]  # no image at all: no hint about dots
    write_tar(url, plain)
    assert "first dot" not in next(iter(ShardReader(url))).detail


def test_every_reader_reject_reason(tmp_path):
    members, expected = bad_shard_members()
    url = str(tmp_path / "bad.tar")
    write_tar(url, members)
    reader = ShardReader(url)
    items = list(reader)
    assert not reader.truncated
    verdicts = {}
    for item in items:
        key = item.key if item.key not in verdicts else f"{item.key}#2"
        verdicts[key] = item.reason if isinstance(item, Reject) else None
    reader_level = {
        k: (v if v not in ("undecodable_image", "too_many_pixels") else None) for k, v in expected.items()
    }
    assert verdicts == reader_level
    by_key = {i.key: i for i in items if isinstance(i, Sample)}
    assert by_key["json-caption"].caption == "from json"
    assert by_key["json-caption"].meta["url"] == "http://x"
    assert by_key["extras"].image_ext == "jpg"
    assert by_key["extras"].extra == {"seg.png": b"\x89PNG..", "cls": b"3"}
    assert by_key["ok"].image == members[0][1]  # the original bytes, untouched


def test_truncated_shard_keeps_samples_before_the_cut(tmp_path):
    samples = [make_sample(f"s{i}", caption=f"caption {i}") for i in range(5)]
    full = tmp_path / "full.tar"
    write_samples_shard(str(full), samples)
    data = full.read_bytes()
    third_jpg = data.index(b"s2.jpg")  # header of sample 2's first member
    cuts = {
        "inside a member": (third_jpg + 700, ["s0", "s1"], "s2"),
        # s2's header is cut or missing: nothing proves s1 was complete, so s1 is the partial sample
        "inside a header": (third_jpg + 100, ["s0"], "s1"),
        "at a member boundary": (third_jpg, ["s0"], "s1"),
    }
    for name, (cut, whole, partial) in cuts.items():
        path = tmp_path / "cut.tar"
        path.write_bytes(data[:cut])
        reader = ShardReader(str(path))
        items = list(reader)
        kept = [i.key for i in items if isinstance(i, Sample)]
        rejects = [(i.key, i.reason) for i in items if isinstance(i, Reject)]
        assert reader.truncated, name
        assert rejects == [(partial, "truncated")], name
        assert kept == whole, name
    reader = ShardReader(str(full))
    assert len(list(reader)) == 5 and not reader.truncated


def test_img2dataset_folder_reads_as_is(tmp_path):
    jpg = encode(smooth_image())
    members = []
    for i in range(3):
        key = f"0000{i}"
        meta = {
            "key": key,
            "url": f"http://example.com/{i}.jpg",
            "caption": f"web caption {i}",
            "status": "success",
            "width": 48,
            "height": 40,
            "error_message": None,
        }
        members += [
            (f"{key}.jpg", jpg),
            (f"{key}.json", json.dumps(meta).encode()),
            (f"{key}.txt", meta["caption"].encode()),
        ]
    write_tar(str(tmp_path / "00000.tar"), members)
    pq.write_table(pa.table({"key": ["00000"], "status": ["success"]}), tmp_path / "00000.parquet")
    (tmp_path / "00000_stats.json").write_text('{"count": 3, "successes": 3}')
    shards = expand_shards([f"{tmp_path}/*.tar"])
    assert shards == [str(tmp_path / "00000.tar")]
    samples = list(iter_shard(shards[0]))
    assert [s.key for s in samples] == ["00000", "00001", "00002"]
    assert all(isinstance(s, Sample) and s.meta["status"] == "success" for s in samples)
    assert samples[1].caption == "web caption 1" and samples[1].shard == shards[0]


def test_long_unicode_keys_and_compressed_shards(tmp_path, monkeypatch):
    """Every compression a shard's name may say is read as such. Before, a ``.tgz`` (which fsspec's own
    inference does not know) was read as a plain tar: it ended at the first header, and the round
    committed it as an empty truncated shard, every sample lost. A codec missing here (zstd without
    ``zstandard``) fails when the spec expands, with the package to install."""
    key = "folder/" + "k" * 120 + "-café"
    url = str(tmp_path / "long.tar")
    write_samples_shard(url, [make_sample(key, caption="long")])
    (sample,) = iter_shard(url)
    assert sample.key == key and sample.caption == "long"
    raw = (tmp_path / "long.tar").read_bytes()
    for name, data in [("long.tar.gz", gzip.compress(raw)), ("long.tgz", gzip.compress(raw))]:
        (tmp_path / name).write_bytes(data)
    (tmp_path / "long.tar.bz2").write_bytes(bz2.compress(raw))
    (tmp_path / "long.tar.xz").write_bytes(lzma.compress(raw))
    for name in ("long.tar.gz", "long.tgz", "long.tar.bz2", "long.tar.xz"):
        reader = ShardReader(str(tmp_path / name))
        assert [s.key for s in reader] == [key] and not reader.truncated, name
        assert output_name(str(tmp_path / name)) == "long"
    (tmp_path / "long.tar.zst").write_bytes(b"(\xb5/\xfd")  # a zstd frame's magic
    monkeypatch.setattr(sample_module, "available_compressions", lambda: ["gzip", "bz2", "xz"])
    with pytest.raises(UserError, match=r"long.tar.zst: a zstd-compressed shard.*pip install zstandard"):
        expand_shards([f"{tmp_path}/long.*"])


def test_tiny_world_reads_clean(tiny_world):
    counts = Counter()
    for url in expand_shards([f"{tiny_world}/*.tar"]):
        reader = ShardReader(url)
        for item in reader:
            counts[type(item).__name__] += 1
        assert not reader.truncated
    assert counts == {"Sample": 64 + 16 + 16}


def test_parse_header_reads_what_tarfile_reads():
    """Name, size and type as tarfile's frombuf reads them, on its fast path and off it (GNU and pax
    headers, a name prefix, a bad checksum, a corrupt size), for every header of three formats' archives."""
    rng = random.Random(0)
    blocks = []
    for fmt in (tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT):
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w", format=fmt) as tar:
            for name in ("k0.jpg", "dir/0001.txt", "p" * 60 + "/" + "q" * 60 + ".json", "caf\u00e9.jpg"):
                info = tarfile.TarInfo(name)
                info.size = rng.randrange(0, 3000)
                tar.addfile(info, io.BytesIO(bytes(info.size)))
        data = buf.getvalue()
        pos = 0
        while pos + 512 <= len(data) and data[pos : pos + 512] != bytes(512):
            block = data[pos : pos + 512]
            blocks.append(block)
            size = tarfile.TarInfo.frombuf(block, "utf-8", "surrogateescape").size
            pos += 512 + -(-size // 512) * 512
    blocks += [b[:130] + b"9" + b[131:] for b in blocks]  # a digit that is not octal in the size
    blocks += [b[:5] + bytes([b[5] ^ 1]) + b[6:] for b in blocks]  # a changed name: bad checksum
    assert len(blocks) >= 60
    for block in blocks:
        try:
            info = tarfile.TarInfo.frombuf(block, "utf-8", "surrogateescape")
        except tarfile.HeaderError as err:
            with pytest.raises(type(err)):
                parse_header(block)
        else:
            assert parse_header(block) == (info.name, info.size, info.type)


def test_the_reader_fingerprints_the_bytes_it_read(tmp_path):
    """``sha256`` (with ``fingerprint``) is what ``capfilt select`` checks an input against: equal for the same content, read
    plain or gzipped, and different for one changed image byte, which leaves the tar's size as it was."""
    members = [
        ("k0.jpg", b"\xff\xd8" + bytes(700)),
        ("k0.txt", b"a cat"),
        ("k1.jpg", b"\xff\xd8" + bytes(90)),
    ]
    changed = [("k0.jpg", b"\xff\xd8" + bytes(699) + b"\x01"), *members[1:]]
    digests = {}
    for name, ms in (("a.tar", members), ("b.tar", members), ("c.tar", changed)):
        write_tar(str(tmp_path / name), ms)
        reader = ShardReader(str(tmp_path / name), fingerprint=True)
        assert len(list(reader)) == 2
        digests[name] = reader.sha256
    (tmp_path / "a.tar.gz").write_bytes(gzip.compress((tmp_path / "a.tar").read_bytes()))
    gz = ShardReader(str(tmp_path / "a.tar.gz"), fingerprint=True)
    list(gz)
    assert (tmp_path / "a.tar").stat().st_size == (tmp_path / "c.tar").stat().st_size
    assert digests["a.tar"] == digests["b.tar"] == gz.sha256 != digests["c.tar"]
    assert digests["a.tar"] == hashlib.sha256((tmp_path / "a.tar").read_bytes()).hexdigest()  # sha256sum's
    plain = ShardReader(str(tmp_path / "a.tar"))  # the readers that need no fingerprint do not hash
    assert len(list(plain)) == 2 and plain.sha256 == "" and plain.version == {}
    stat = (tmp_path / "c.tar").stat()  # and the version a rerun compares, taken as reading began
    assert reader.version == {"size": str(stat.st_size), "mtime": str(stat.st_mtime)}


def _contents(items) -> list:
    return [
        (i.key, i.reason) if isinstance(i, Reject) else (i.key, i.caption, i.image, i.meta, i.extra)
        for i in items
    ]


def test_a_shard_not_in_key_order_is_read_grouped_by_key(tmp_path, tiny_world):
    """A tar of a folder written without ``--sort=name`` lists its files in the folder's hash order. Before,
    each run of a key's files was read as a sample of its own: the tiny world's 32-sample shard read as 92
    "samples", 5 of them whole, the images cleaned without their captions and the rest rejected
    (``split_sample``, ``missing_image``); finetuning on such a human shard found 1 pair of 32."""
    src, hashed = f"{tiny_world}/web-000000.tar", str(tmp_path / "hashed.tar")
    scrambled(src, hashed)
    with pytest.raises(NotInKeyOrder, match="hashed.tar is not in key order"):
        list(ShardReader(hashed))
    in_order = list(ShardReader(src))
    reader = ShardReader(hashed, fingerprint=True, grouped=True)
    grouped = list(reader)
    assert sorted(_contents(grouped)) == sorted(_contents(in_order)) and len(in_order) == 32
    assert reader.sha256 == hashlib.sha256(Path(hashed).read_bytes()).hexdigest() and not reader.truncated
    assert read_shard(hashed, lambda r: (_contents(r), r.grouped)) == (_contents(grouped), True)
    # grouped or streamed, a shard in key order reads the same, and read_shard reads it once
    assert _contents(ShardReader(src, grouped=True)) == _contents(in_order)
    assert read_shard(src, lambda r: (_contents(r), r.grouped)) == (_contents(in_order), False)
    inspected = inspect_input(hashed, 0)
    assert "input shard, 32 samples, 32 readable" in inspected and "NOT IN KEY ORDER" in inspected
    # the held-out split (eval, and calibration's human pairs) too, where a test set made by hand is likely
    test = f"{tiny_world}/test-000000.tar"
    scrambled(test, str(tmp_path / "test.tar"))
    run = RunConfig(image_size=32)
    held, want = load_heldout([str(tmp_path / "test.tar")], run, limit=9), load_heldout([test], run)
    index = {key: i for i, key in enumerate(want.keys)}
    assert len(held.keys) == 9 and len(index) == 16
    for i, key in enumerate(held.keys):
        assert held.references[i] == want.references[index[key]]
        assert torch.equal(held.pixels[i], want.pixels[index[key]])


def test_held_out_images_without_a_caption_are_left_out_and_counted(tmp_path):
    """Before, an image without a caption entered eval with the reference "" (a traceback from CIDEr when
    none had one) and a json "captions" string was read as a list of its letters. A txt of one caption per
    line (CLIP_benchmark's retrieval sets) was one reference of all the lines."""
    jpg = [encode(smooth_image(seed=i)) for i in range(5)]
    members = [("a.jpg", jpg[0]), ("a.txt", b"a cat"), ("b.jpg", jpg[1]), ("b.txt", b"  "), ("c.jpg", jpg[2])]
    members += [("d.jpg", jpg[3]), ("d.json", json.dumps({"captions": ["one", " ", "two"]}).encode())]
    members += [
        ("e.jpg", jpg[4]),
        ("e.json", json.dumps({"captions": "a dog"}).encode()),
        ("e.txt", b"a dog"),
    ]
    members += [("f.webp", encode(smooth_image(seed=5), "WEBP")), ("f.txt", b"a cow\nthe cow\n\n")]
    write_tar(str(tmp_path / "test.tar"), members)
    held = load_heldout([str(tmp_path / "test.tar")], RunConfig(image_size=16))
    assert held.keys == ["a", "d", "e", "f"] and held.rejects == {"no_caption": 2}
    assert held.references == [["a cat"], ["one", "two"], ["a dog"], ["a cow", "the cow"]]


def test_held_out_samples_of_one_image_are_one_image(tmp_path):
    """img2dataset writes COCO as one sample per caption. Each was an image of its own before: an image's
    other captions counted as misses in text retrieval, its copies as rivals in image retrieval, and
    captioning was scored against one reference. Samples with the same image bytes are one image now, in
    any shard; its captions are its references, and each image is decoded and counted once."""
    jpg = [encode(smooth_image(seed=i)) for i in range(4)]
    bomb = b"\x89PNG not an image"
    first = [("a0", jpg[0], "a cat"), ("a1", jpg[0], "a small cat"), ("b0", jpg[1], "a dog")]
    first += [("x0", bomb, "broken"), ("x1", bomb, "broken too"), ("c0", jpg[2], "a cow")]
    second = [("a2", jpg[0], "the cat"), ("c1", jpg[2], "cows"), ("n0", jpg[3], " "), ("d0", jpg[3], "a doe")]
    for name, samples in (("0", first), ("1", second)):
        write_tar(
            str(tmp_path / f"{name}.tar"),
            [m for k, j, t in samples for m in ((f"{k}.jpg", j), (f"{k}.txt", t.encode()))],
        )
    shards = [str(tmp_path / "0.tar"), str(tmp_path / "1.tar")]
    held = load_heldout(shards, RunConfig(image_size=16))
    assert held.keys == ["a0", "b0", "c0", "d0"] and len(held.pixels) == 4
    assert held.references == [["a cat", "a small cat", "the cat"], ["a dog"], ["a cow", "cows"], ["a doe"]]
    assert held.joined == 3 and held.rejects == {"undecodable_image": 2, "no_caption": 1}
    assert len(held.keys) + held.joined + sum(held.rejects.values()) == len(first) + len(second)
    single = load_heldout([shards[0]], RunConfig(image_size=16))
    assert torch.equal(held.pixels[:3], single.pixels[:])
    # the limit counts images: the third stops the first shard, before c0; a2 is not read at all
    assert load_heldout(shards, RunConfig(image_size=16), limit=2).references == [
        ["a cat", "a small cat"],
        ["a dog"],
    ]


def test_images_first_then_captions_and_a_sample_there_twice(tmp_path):
    """``tar -cf shard.tar *.jpg *.txt`` puts every image first: each sample comes in two parts, now read
    as one. A sample that is truly there twice is still a ``duplicate_key``, and a key the shard was cut
    inside is ``truncated``, whichever of its files came before the cut."""
    jpg = encode(smooth_image())
    members = [(f"{k}.jpg", jpg) for k in ("a", "b")] + [(f"{k}.txt", k.encode()) for k in ("a", "b")]
    members += [("c.jpg", jpg), ("c.txt", b"c"), ("a.jpg", jpg), ("a.txt", b"a again")]
    url = str(tmp_path / "globbed.tar")
    write_tar(url, members)
    items = read_shard(url, list)
    assert [(i.key, getattr(i, "reason", "sample")) for i in items] == [
        ("a", "sample"),
        ("b", "sample"),
        ("c", "sample"),
        ("a", "duplicate_key"),
    ]
    assert [i.caption for i in items[:3]] == ["a", "b", "c"]
    write_tar(url, members[:4] + [("b.json", b"{}")])
    whole = Path(url).read_bytes()
    Path(url).write_bytes(whole[: whole.index(b"b.json") + 514])  # inside b.json, after its header
    reader = ShardReader(url, grouped=True)
    assert [(i.key, getattr(i, "reason", "sample")) for i in reader] == [("a", "sample"), ("b", "truncated")]
    assert reader.truncated
    notes = input_notes({"shards": 3, "truncated_shards": [], "unordered_shards": [url, "x.tar"]})
    assert notes[0].startswith(f"2 of 3 shards were not in key order ({url} and 1 more")
    assert not input_notes({"shards": 1, "truncated_shards": [], "rejected": {"duplicate_key": 1}})


def zip_of(path) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.write(path, "shard.tar")
    return buf.getvalue()


def test_a_file_that_is_no_tar_says_what_it_is(tmp_path):
    """An error page or an empty file saved under a shard's name is a shard that ends at once; before, the
    reason said "cut inside a header" or "no end-of-archive marker", and `capfilt run` said nothing."""
    raw = tmp_path / "real.tar"
    write_tar(str(raw), [("a.jpg", encode(smooth_image())), ("a.txt", b"a")])
    files = {
        "page.tar": (
            b"<html><body>403 Forbidden</body></html>",
            "not a tar archive: it starts with b'<html>",
        ),
        "empty.tar": (b"", "an empty file"),
        "zip.tar": (zip_of(raw), "not a tar archive but a zip archive: it starts with b'PK"),
        "gz.tar": (gzip.compress(raw.read_bytes()), "gzip-compressed: name it with .tar.gz"),
        "cut.tar": (raw.read_bytes()[:300], "cut inside a header"),  # a tar's first header, cut: a tar still
    }
    for name, (data, why) in files.items():
        (tmp_path / name).write_bytes(data)
        reader = ShardReader(str(tmp_path / name))
        assert list(reader) == [] and reader.truncated and why in reader.truncation_detail, name
    page = str(tmp_path / "page.tar")
    summary = {"shards": 5, "truncated_shards": [page] * 4, "rejected": {}}  # a summary from before: no why
    note = input_notes(summary)[0]
    assert note.startswith("4 of 5 shards ended early") and "capfilt inspect SHARD" in note
    why = "not a tar archive: it starts with b'<html>'"
    note = input_notes(summary | {"ended_early": {page: why}})[0]
    assert f"4 of 5 shards ended early ({page}: {why} and 3 more; ended_early in summary.json)" in note


def test_keys_that_would_extract_outside_the_folder_are_rejected(tmp_path):
    """A round's output members are named by the input keys; before, ``../../x.jpg`` and ``/abs/x.jpg``
    went into the cleaned tar as they were, for whoever extracts the dataset (tar-slip)."""
    jpg = encode(smooth_image())
    names = ["../up/a.jpg", "../up/a.txt", "/abs/b.jpg", "x/../c.jpg", "safe/d.jpg", "./e.jpg", "f..g/h.jpg"]
    url = str(tmp_path / "names.tar")
    write_tar(url, [(n, b"a" if n.endswith(".txt") else jpg) for n in names])
    got = [f"{i.key}:{getattr(i, 'reason', 'sample')}" for i in iter_shard(url)]
    assert got == [
        "../up/a:unsafe_key",
        "/abs/b:unsafe_key",
        "x/../c:unsafe_key",
        "safe/d:sample",
        "./e:sample",
        "f..g/h:sample",  # two dots in a folder's name are not a '..' part
    ]


def test_a_corpus_keeps_its_alt_text_where_run_caption_from_says(tmp_path):
    """A corpus with its alt-text in a ``caption`` member or another json key had every image judged on
    synthetic captions alone, said by nothing but a count in the summary."""
    jpg = encode(smooth_image())
    url = str(tmp_path / "elsewhere.tar")
    write_tar(
        url,
        [
            *[("a.jpg", jpg), ("a.caption", b" a red circle "), ("a.json", b'{"alt": "a circle"}')],
            *[("b.jpg", jpg), ("b.json", b'{"alt": "a blue square"}')],
            *[("c.jpg", jpg), ("c.json", b'{"alt": 3}'), ("d.jpg", jpg), ("d.caption", b"\xff")],
        ],
    )
    by_default = list(ShardReader(url))
    assert [s.caption for s in by_default[:2]] == ["", ""] and by_default[0].extra == {
        "caption": b" a red circle "
    }

    got = [
        i.reason if isinstance(i, Reject) else i.caption
        for i in ShardReader(url, caption_from=("caption", "json.alt"))
    ]
    assert got == ["a red circle", "a blue square", "bad_text", "bad_text"]
    assert [getattr(i, "caption", None) for i in ShardReader(url, caption_from=("json.alt",))][:2] == [
        "a circle",
        "a blue square",
    ]
    notes = input_notes(
        {"shards": 1, "truncated_shards": [], "rejected": {}, "kept": 3, "dropped": 1, "no_web_caption": 4}
    )
    assert (
        notes[0].startswith("none of the 4 samples cleaned had a web caption")
        and "run.caption_from" in notes[0]
    )
    assert not input_notes({"shards": 1, "rejected": {}, "kept": 3, "dropped": 1, "no_web_caption": 3})
    inspected = inspect_input(url, 0)
    assert "without a web caption in txt, json.caption (run.caption_from): 4" in inspected
    assert "their other members and json strings: caption (2), json.alt (2)" in inspected


def test_a_compressed_shard_cut_short_keeps_the_samples_before_the_cut(tmp_path):
    """A ``.tar.gz`` or ``.tar.xz`` whose download stopped raised EOFError out of the reader: the round failed
    the shard on every try and every rerun, losing the samples before the cut that a cut plain tar keeps,
    and ``capfilt inspect`` printed only "Aborted.". An error page saved as ``.tar.gz`` raised BadGzipFile."""
    rng = random.Random(0)
    members = [
        m for i in range(20) for m in ((f"{i:03d}.jpg", rng.randbytes(3000)), (f"{i:03d}.txt", b"a cat"))
    ]
    raw = tmp_path / "whole.tar"
    write_tar(str(raw), members)
    for name, pack in (("cut.tar.gz", gzip.compress), ("cut.tar.xz", lzma.compress)):
        (tmp_path / name).write_bytes(pack(raw.read_bytes())[: raw.stat().st_size // 2])
        reader = ShardReader(str(tmp_path / name))
        items = list(reader)
        assert reader.truncated and "the compressed stream is cut" in reader.truncation_detail, name
        assert 5 < len(items) < 20 and {type(i) for i in items[:-1]} == {Sample}, name
        assert items[-1].reason == "truncated", name
    corrupt = bytearray(gzip.compress(raw.read_bytes()))
    corrupt[-8] ^= 0xFF  # the gzip trailer's CRC: every sample reads whole, then the check fails
    (tmp_path / "corrupt.tar.gz").write_bytes(bytes(corrupt))
    reader = ShardReader(str(tmp_path / "corrupt.tar.gz"), fingerprint=True)  # hashed: read to the end
    assert len([i for i in reader if isinstance(i, Sample)]) == 20 and reader.truncated
    assert "BadGzipFile: CRC check failed" in reader.truncation_detail
    (tmp_path / "page.tar.gz").write_bytes(b"<html><body>403 Forbidden</body></html>")  # a failed download
    reader = ShardReader(str(tmp_path / "page.tar.gz"))
    assert list(reader) == [] and "Not a gzipped file (b'<h')" in reader.truncation_detail
