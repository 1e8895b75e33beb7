"""The records that flow between stages: a sample read from a shard, a reject, a scored candidate; and
what an input shard may hold (image extensions) and be (a tar, plain or compressed as its name says).

Errors are data: a sample that cannot go on becomes a ``Reject`` with a reason from ``REJECT_REASONS``
and is counted in the shard's stats, so that in = kept + dropped + rejected holds for every shard.
"""

from __future__ import annotations

import hashlib
import posixpath
import urllib.parse
from dataclasses import dataclass, field
from typing import Any, Literal

from fsspec import available_compressions
from fsspec.utils import infer_compression

from capfilt.errors import UserError

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "gif", "bmp")
# Where a sample's web caption is by default (``run.caption_from``): its txt member, else its json's caption.
CAPTION_FROM = ("txt", "json.caption")


def listed_captions(meta: dict) -> list[str]:
    """The strings of a sample's ``json["captions"]`` (human and test shards list their references there);
    [] when it is not a list (a string would be read as a list of its letters)."""
    listed = meta.get("captions")
    return [c for c in listed if isinstance(c, str)] if isinstance(listed, list) else []


def caption_lines(caption: str) -> list[str]:
    """A caption's non-blank lines, each a reference of a human or test image. CLIP_benchmark writes its
    retrieval sets (COCO, Flickr30k: ``clip-benchmark/wds_*``) a sample per image, with the captions one
    per line of its txt. A round scores a web caption whole."""
    return [line.strip() for line in caption.split("\n") if line.strip()]


def image_id(image: bytes) -> int:
    """A stable 63-bit id of an image's bytes. One picture under several keys is one image: img2dataset
    writes COCO as one sample per caption, and those captions are one image's references (eval) and
    positives of each other (ITC/ITM finetuning), never negatives. SHA-256 has CPU instructions, so it is
    hashlib's fastest here: 0.39 ms for a 700 kB JPEG (BLAKE2b 0.74), against 9.6 ms to decode it."""
    return int.from_bytes(hashlib.sha256(image).digest()[:8], "big") >> 1


# A shard's file ending → the codec fsspec decompresses it with (None: a plain tar); longest match first.
SHARD_SUFFIXES = {
    ".tar.gz": "gzip",
    ".tar.bz2": "bz2",
    ".tar.xz": "xz",
    ".tar.zst": "zstd",
    ".tar.lz4": "lz4",
    ".tgz": "gzip",
    ".tar": None,
}
_CODEC_PACKAGES = {"zstd": "zstandard", "lz4": "lz4"}


def shard_path(url: str) -> str:
    """The part of a shard URL that names its file: not an http(s) URL's query and fragment (a presigned
    ``.../web-0.tar.gz?X-Amz-Signature=...`` names ``web-0.tar.gz``), nor the version an S3 URL pins
    (``s3://b/web-0.tar.gz?versionId=...``, which s3fs reads)."""
    scheme = url.split("://", 1)[0].lower() if "://" in url else ""
    if scheme in ("http", "https"):
        return urllib.parse.urlsplit(url).path
    if scheme in ("s3", "s3a"):
        return url.partition("?versionId=")[0]
    return url


def shard_file_name(url: str) -> str:
    """The file name a shard URL ends in (``shard_path``'s last part)."""
    return posixpath.basename(shard_path(url).rstrip("/"))


def shard_suffix(url: str) -> str | None:
    """The ending of ``SHARD_SUFFIXES`` that a shard's file name has, in any case (WEB-0.TAR.GZ too)."""
    name = shard_file_name(url).lower()
    return next((s for s in SHARD_SUFFIXES if name.endswith(s)), None)


def shard_compression(url: str) -> str | None:
    """The codec a shard's name says (``.tgz`` is gzip, which fsspec's own inference misses); another name
    is inferred as fsspec does. Raises when nothing here decompresses it: read as a tar, its compressed
    bytes end at the first header, and every sample of the shard would be lost as a truncated shard."""
    suffix = shard_suffix(url)
    codec = SHARD_SUFFIXES[suffix] if suffix else infer_compression(shard_file_name(url))
    if codec is not None and codec not in available_compressions():
        raise UserError(
            f"{url}: a {codec}-compressed shard, and nothing in this environment decompresses {codec}: "
            f"`pip install {_CODEC_PACKAGES.get(codec, codec)}`, or recompress the shards"
        )
    return codec


# Every reason a sample can be rejected for; stats count by these names.
REJECT_REASONS = {
    "missing_image": "no jpg/jpeg/png/webp/gif/bmp member",
    "unsafe_key": "an absolute key or one with a '..' part: written out, it would extract outside its folder",
    "duplicate_key": "a key seen earlier in the same shard",
    "bad_text": "caption bytes are not UTF-8, or a json caption that is not a string",
    "bad_json": "json member does not parse to an object",
    "truncated": "the shard was cut inside this sample",
    "empty_image": "zero-byte image member",
    "undecodable_image": "the image bytes do not decode",
    "too_many_pixels": "the image exceeds the pixel limit (decompression bomb)",
    "caption_failed": "the captioner raised on this sample",
    "score_failed": "the filter raised on this sample",
}

Source = Literal["web", "synthetic"]


@dataclass
class Sample:
    """One image-text pair as read from a WebDataset shard, original bytes untouched."""

    key: str
    shard: str  # URL of the shard it came from
    image: bytes  # original image bytes, never re-encoded
    image_ext: str  # the member extension the image came from (lower case)
    caption: str  # the web caption (txt, else json["caption"]); "" when none: only synthetic candidates
    meta: dict[str, Any] = field(default_factory=dict)  # parsed json member, {} when absent
    extra: dict[str, bytes] = field(default_factory=dict)  # every other member, carried through


@dataclass
class Reject:
    """A sample that cannot go on, with its reason (a key of REJECT_REASONS) and a human detail."""

    key: str | None
    shard: str
    reason: str
    detail: str = ""

    def __post_init__(self) -> None:
        if self.reason not in REJECT_REASONS:
            raise ValueError(f"unknown reject reason {self.reason!r}; add it to REJECT_REASONS")


@dataclass
class Candidate:
    """One caption of a sample with its filter scores and the selection decision."""

    text: str
    source: Source
    itm: float = float("nan")  # ITM match probability
    itc: float = float("nan")  # ITC cosine similarity
    kept: bool = False


@dataclass
class ScoredSample:
    """A sample after the filter and the selection policy: all candidates scored, the decision made."""

    sample: Sample
    candidates: list[Candidate]
    kept: bool  # any candidate kept
    caption: str  # the best kept candidate's text ("" when dropped)


@dataclass
class ShardStats:
    """Per-shard accounting. The law: n_in == kept + dropped + sum(rejected.values())."""

    shard: str
    n_in: int = 0
    kept: int = 0
    dropped: int = 0
    rejected: dict[str, int] = field(default_factory=dict)
    rejects: list[dict[str, Any]] = field(default_factory=list)  # {key, reason, detail}, for debugging
    truncated: bool = False
    truncation_detail: str = ""  # why it ended early, when it did ("" in stats from before 2026-11-28)
    unordered: bool = False  # its keys' files stood apart: read again, grouped by key (data.reader)
    no_web_caption: int = 0  # scored samples that had no usable web caption (captioned all the same)
    kept_by_source: dict[str, int] = field(default_factory=dict)  # kept candidates: web / synthetic
    candidates_by_source: dict[str, int] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)  # seconds per stage
    input_sha256: str = ""  # of the input shard's bytes as read ("" from before it was recorded)
    input_version: dict[str, str] = field(default_factory=dict)  # its size and store version (data.versions)

    def reject(self, r: Reject) -> None:
        self.rejected[r.reason] = self.rejected.get(r.reason, 0) + 1
        self.rejects.append({"key": r.key, "reason": r.reason, "detail": r.detail})

    def check(self) -> None:
        """Raise if a sample went missing: nothing is lost silently."""
        total = self.kept + self.dropped + sum(self.rejected.values())
        if total != self.n_in:
            raise AssertionError(f"{self.shard}: in={self.n_in} but kept+dropped+rejected={total}")
