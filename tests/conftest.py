"""Shared fixtures: real images and real shards written to temporary folders, a moto S3 server."""

from __future__ import annotations

import io
import os
import random
import sys
import tarfile

import numpy as np
import pytest
from fsspec.core import url_to_fs
from PIL import Image

from capfilt.config import SynthConfig
from capfilt.data.sample import Sample

_session: pytest.Session | None = None


def pytest_sessionfinish(session: pytest.Session) -> None:
    global _session
    _session = session


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config: pytest.Config) -> None:
    """Leave with pytest's exit status once it has reported everything, skipping the interpreter's teardown.

    Why: the suite loads torch, Ray, DALI, pyarrow and tokenizers into one process, and once (2026-11-27,
    after "213 passed, 2 skipped" was printed) a native thread crashed in that teardown with a
    segmentation fault (the kernel log: an instruction pointer in freed heap, on a thread's stack), which
    failed a green run (make: "Segmentation fault"). The results were final by then; the teardown tests
    nothing.
    """
    if _session is not None:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(int(_session.exitstatus))


def is_done(out: str, name: str) -> bool:
    """Whether the shard NAME is committed in ``out``: its done marker, which the writer puts last, exists."""
    fs, path = url_to_fs(f"{out.rstrip('/')}/{name}.done")
    return fs.exists(path)


def encode(im: Image.Image, fmt: str = "JPEG", **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


def smooth_image(w: int = 48, h: int = 40, seed: int = 0) -> Image.Image:
    """A smooth RGB test picture (blocks of colour plus a gradient): decoders agree closely on it."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    img = np.stack([xx * 255 / w, yy * 255 / h, np.full_like(xx, rng.integers(0, 255))], -1)
    img[: h // 2, : w // 2] = rng.integers(0, 255, 3)
    return Image.fromarray(img.astype(np.uint8))


def make_sample(key: str, image: bytes | None = None, caption: str = "a red circle", **meta) -> Sample:
    image = encode(smooth_image()) if image is None else image
    return Sample(key, "", image, "jpg", caption, meta)


def scrambled(src: str, dst: str, seed: int = 0) -> None:
    """The shard's files in a random order, as ``tar -cf`` of a folder lists them (in its hash order)."""
    from capfilt.data.writer import write_tar

    with tarfile.open(src) as tar:
        members = [(m.name, tar.extractfile(m).read()) for m in tar.getmembers() if m.isfile()]
    random.Random(seed).shuffle(members)
    write_tar(dst, members)


@pytest.fixture(scope="session")
def tiny_world(tmp_path_factory) -> str:
    """The tiny demo world (configs/tiny.yaml sizes), written once per test session."""
    from capfilt.data.synth import write_world

    out = str(tmp_path_factory.mktemp("world"))
    write_world(out, SynthConfig(image_size=32, n_web=64, n_human=16, n_test=16, shard_size=32))
    return out


def _forged_png(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims width×height pixels: a decompression bomb's shape."""
    import struct
    import zlib

    png = bytearray(encode(Image.new("L", (1, 1)), "PNG"))
    ihdr = struct.pack(">II", width, height) + bytes(png[24:29])
    png[16:29] = ihdr
    png[29:33] = struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))
    return bytes(png)


def decode_cases() -> dict[str, tuple[bytes, str, str | None]]:
    """Image members that read fine but stress the decoder: key → (bytes, ext, reject reason or None)."""
    good = smooth_image()
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° when displayed
    frames = [Image.new("P", (16, 16), i) for i in (1, 2)]
    gif = io.BytesIO()
    frames[0].save(gif, "GIF", save_all=True, append_images=frames[1:], duration=100)
    transparent = good.convert("P")
    return {
        "truncated-jpeg": (encode(good)[:300], "jpg", "undecodable_image"),
        "not-an-image": (b"<html>404 not found</html>", "jpg", "undecodable_image"),
        "bomb-header": (_forged_png(20000, 20000), "png", "too_many_pixels"),
        "over-limit": (encode(Image.new("1", (2000, 1000)), "PNG"), "png", "too_many_pixels"),
        "cmyk": (encode(good.convert("CMYK")), "jpg", None),
        "gray": (encode(good.convert("L"), "PNG"), "png", None),
        "gray-alpha": (encode(good.convert("LA"), "PNG"), "png", None),
        "gray-16bit": (
            encode(Image.fromarray(np.asarray(good.convert("L")).astype(np.uint16) * 257), "PNG"),
            "png",
            None,
        ),
        "rgba": (encode(good.convert("RGBA"), "PNG"), "png", None),
        "palette-transparent": (encode(transparent, "PNG", transparency=0), "png", None),
        "palette": (encode(good.convert("P"), "PNG"), "png", None),
        "animated-gif": (gif.getvalue(), "gif", None),
        "exif-rotated": (encode(good, exif=exif.tobytes()), "jpg", None),
        "one-pixel": (encode(Image.new("RGB", (1, 1), (200, 10, 10)), "PNG"), "png", None),
        "wide": (encode(Image.new("RGB", (4000, 4), (10, 200, 10))), "jpg", None),
        "webp": (encode(good, "WEBP"), "webp", None),
        "bmp": (encode(good, "BMP"), "bmp", None),
    }


DECODE_MAX_PIXELS = 1_500_000  # the decoder limit the cases above are written for


def bad_shard_members() -> tuple[list[tuple[str, bytes]], dict[str, str | None]]:
    """Tar members with every reader-level and decode-level problem, and the expected verdict per key."""
    jpg = encode(smooth_image())
    members = [
        ("ok.jpg", jpg),
        ("ok.txt", b"a red circle"),
        ("json-caption.jpg", jpg),
        ("json-caption.json", b'{"caption": "from json", "url": "http://x"}'),
        ("extras.JPG", jpg),
        ("extras.txt", b"extras"),
        ("extras.seg.png", b"\x89PNG.."),
        ("extras.cls", b"3"),
        ("sub/dir/nested.jpg", jpg),
        ("sub/dir/nested.txt", b"nested key"),
        ("missing-image.txt", b"no image"),
        ("missing-image.json", b"{}"),
        ("missing-caption.jpg", jpg),
        ("missing-caption-json.jpg", jpg),
        ("missing-caption-json.json", b'{"url": "http://x"}'),
        ("dup.jpg", jpg),
        ("dup.txt", b"first"),
        ("between.jpg", jpg),
        ("between.txt", b"between"),
        ("dup.jpg", jpg),
        ("dup.txt", b"again"),
        ("twice.jpg", jpg),
        ("twice.jpg", jpg),
        ("twice.txt", b"twice"),
        ("bad-utf8.jpg", jpg),
        ("bad-utf8.txt", b"\xff\xfe caf\xe9"),
        ("empty-text.jpg", jpg),
        ("empty-text.txt", b"  \n"),
        ("json-caption-number.jpg", jpg),
        ("json-caption-number.json", b'{"caption": 5}'),
        ("bad-json.jpg", jpg),
        ("bad-json.txt", b"caption"),
        ("bad-json.json", b"{not json"),
        ("json-list.jpg", jpg),
        ("json-list.txt", b"caption"),
        ("json-list.json", b"[1, 2]"),
        ("json-nan.jpg", jpg),
        ("json-nan.txt", b"caption"),
        ("json-nan.json", b'{"x": NaN}'),
        ("empty-image.jpg", b""),
        ("empty-image.txt", b"empty"),
        (".hidden", b"skip me"),
        ("README", b"no extension: not a sample member"),
    ]
    expected = {
        "ok": None,
        "json-caption": None,
        "extras": None,
        "sub/dir/nested": None,
        "between": None,
        "missing-image": "missing_image",
        "missing-caption": None,  # no web caption: captioned, its candidates are synthetic only
        "missing-caption-json": None,
        "dup#2": "duplicate_key",
        "dup": None,
        "twice": "duplicate_key",
        "bad-utf8": "bad_text",
        "empty-text": None,
        "json-caption-number": "bad_text",
        "bad-json": "bad_json",
        "json-list": "bad_json",
        "json-nan": "bad_json",
        "empty-image": "empty_image",
    }
    for key, (data, ext, reason) in decode_cases().items():
        members += [(f"{key}.{ext}", data), (f"{key}.txt", key.encode())]
        expected[key] = reason
    return members, expected


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """A moto S3 server with a bucket ``bucket``; AWS_ENDPOINT_URL and credentials point at it (and
    reach subprocesses started from the test)."""
    import urllib.request

    import fsspec
    import s3fs
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    env = {
        "AWS_ENDPOINT_URL": f"http://{host}:{port}",
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    with pytest.MonkeyPatch.context() as mp:
        for k, v in env.items():
            mp.setenv(k, v)
        # moto keeps one in-memory backend per process, shared by every server: start each module empty
        urllib.request.urlopen(
            urllib.request.Request(f"{env['AWS_ENDPOINT_URL']}/moto-api/reset", method="POST")
        )
        s3fs.S3FileSystem.clear_instance_cache()
        fs = fsspec.filesystem("s3")
        fs.mkdir("bucket")
        yield fs
        s3fs.S3FileSystem.clear_instance_cache()
    server.stop()


@pytest.fixture
def disk_events(monkeypatch) -> list[tuple[str, str]]:
    """What reaches the disk, in order: ("fsync", path) for each os.fsync, ("rename", destination) for
    each os.rename and os.replace, so a test can check that data is flushed before it is named."""
    events: list[tuple[str, str]] = []
    fsync, rename, replace = os.fsync, os.rename, os.replace

    def record_fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        fsync(fd)

    def recorder(real):
        def record(src, dst, *args, **kwargs):
            real(src, dst, *args, **kwargs)
            events.append(("rename", os.path.abspath(dst)))

        return record

    monkeypatch.setattr(os, "fsync", record_fsync)
    monkeypatch.setattr(os, "rename", recorder(rename))
    monkeypatch.setattr(os, "replace", recorder(replace))
    return events
