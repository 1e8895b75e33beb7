"""The records that flow between stages: a sample read from a shard, a reject, a scored candidate.

Errors are data: a sample that cannot go on becomes a ``Reject`` with a reason from ``REJECT_REASONS``
and is counted in the shard's stats, so that in = kept + dropped + rejected holds for every shard.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "gif", "bmp")

# Every reason a sample can be rejected for; stats count by these names.
REJECT_REASONS = {
    "missing_image": "no jpg/jpeg/png/webp/gif/bmp member",
    "missing_caption": "no txt member and no json caption",
    "duplicate_key": "a key seen earlier in the same shard",
    "bad_text": "caption bytes are not UTF-8, or empty after normalisation",
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
    caption: str  # the web caption (txt, else json["caption"])
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
