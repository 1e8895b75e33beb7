"""Image bytes → normalised tensors, BLIP's inference preprocessing, with every failure a Reject.

Preprocessing (BLIP_REFERENCE.md, 'Preprocessing'): RGB, bicubic resize straight to S×S (no crop),
/255, then CLIP's mean and std; a tensor is float32 3×S×S.

Pixel modes, decided once here and followed by every decoder:
- alpha (RGBA, LA, PA, palette or L/RGB with a transparency colour) is composited on white: web
  images with transparency are mostly logos and cut-outs drawn on white pages;
- 16-bit grayscale (I;16, I) is scaled to 8 bits (value / 257), not clipped;
- CMYK, palette, 1-bit, YCbCr... go through Pillow's RGB conversion;
- EXIF orientation is applied; an animated image gives its first frame.
The pixel limit is checked from the header (``Image.open`` is lazy) before any pixel is decoded, so a
decompression bomb costs a header read. Big JPEGs are decoded at a reduced DCT scale (``draft``),
never below S, which is several times faster and changes the result by less than the resize does.
"""

from __future__ import annotations

import io
import re
import warnings
from abc import ABC, abstractmethod
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from PIL import Image, ImageOps

from capfilt.data.sample import Reject, Sample

MEAN = (0.48145466, 0.4578275, 0.40821073)
STD = (0.26862954, 0.26130258, 0.27577711)
_MEAN = np.array(MEAN, dtype=np.float32) * 255
_STD = np.array(STD, dtype=np.float32) * 255
_ALPHA_MODES = {"RGBA", "LA", "PA", "La", "RGBa"}
_DECODE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError, TypeError)


def error_text(err: Exception) -> str:
    """An exception as reject detail, without the object addresses Pillow puts in its messages, so that
    stats.json is byte-identical across runs."""
    return re.sub(r" at 0x[0-9a-fA-F]+", "", f"{type(err).__name__}: {err}")


def normalize(rgb: np.ndarray, out: torch.Tensor | None = None) -> torch.Tensor:
    """H×W×3 uint8 RGB → 3×H×W float32, (x/255 - mean) / std, written into ``out`` when given (a batch's row).

    Transposed while still uint8 and normalised in place, one channel plane at a time: the same float32
    arithmetic as broadcasting over the last axis of 3, bit for bit, but 3× faster at 64 px and 9× at
    384 px, where it was most of Pillow's per-image time (docs/BENCHMARKS.md, 'Decode throughput').
    """
    planes = to_planes(rgb)
    if out is None:
        out = torch.from_numpy(planes.astype(np.float32))
    else:
        np.copyto(out.numpy(), planes, casting="unsafe")  # uint8 → float32, exactly
    _standardize(out.numpy())
    return out


def to_planes(rgb: np.ndarray) -> np.ndarray:
    """H×W×3 → 3×H×W, contiguous, still uint8."""
    return np.ascontiguousarray(rgb.transpose(2, 0, 1))


def _standardize(x: np.ndarray) -> None:
    """(x - mean) / std in place, x float32 [..., 3, H, W] of 0..255 values."""
    x -= _MEAN[:, None, None]
    x /= _STD[:, None, None]


class Planes:
    """Decoded images kept as uint8 [N, 3, S, S] and normalised a slice at a time, bit for bit as
    :func:`normalize`: a split held whole in memory (eval, calibration) takes a quarter of float32's
    bytes (COCO's 5,000 test images at 384 px: 2.2 GB, not 8.8)."""

    def __init__(self, planes: torch.Tensor):
        if planes.dtype != torch.uint8:  # a float tensor would be normalised in place, twice on a re-read
            raise TypeError(f"Planes hold uint8 pixels, got {planes.dtype}")
        self.planes = planes

    def __len__(self) -> int:
        return len(self.planes)

    def __getitem__(self, index) -> torch.Tensor:
        x = self.planes[index].float()
        _standardize(x.numpy())
        return x


def open_checked(sample: Sample, max_pixels: int) -> Image.Image | Reject:
    """Open lazily (header only) and apply the pixel limit; the Reject says why not."""
    if not sample.image:
        return Reject(sample.key, sample.shard, "empty_image", "0 bytes")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(sample.image))
    except Image.DecompressionBombError as err:
        return Reject(sample.key, sample.shard, "too_many_pixels", str(err))
    except _DECODE_ERRORS as err:
        return Reject(sample.key, sample.shard, "undecodable_image", error_text(err))
    w, h = im.size
    if w * h > max_pixels:
        return Reject(sample.key, sample.shard, "too_many_pixels", f"{w}x{h} > {max_pixels} pixels")
    return im


def has_alpha(im: Image.Image) -> bool:
    """An alpha channel or a transparency colour (known from the header)."""
    return im.mode in _ALPHA_MODES or "transparency" in im.info


def to_rgb(im: Image.Image) -> Image.Image:
    """Any Pillow mode → RGB, with the choices in the module docstring."""
    if im.mode in ("I;16", "I;16B", "I;16L", "I"):
        a = np.asarray(im, dtype=np.float32)
        im = Image.fromarray(np.clip(a / 257.0 + 0.5, 0, 255).astype(np.uint8))
    if has_alpha(im):
        im = im.convert("RGBA")
        white = Image.new("RGBA", im.size, (255, 255, 255, 255))
        im = Image.alpha_composite(white, im)
    return im if im.mode == "RGB" else im.convert("RGB")


def pillow_decode(
    sample: Sample, image_size: int, max_pixels: int, out: torch.Tensor | None = None
) -> torch.Tensor | Reject:
    """One sample's image → normalised 3×S×S tensor (written into ``out`` when given), or a Reject."""
    rgb = pillow_rgb(sample, image_size, max_pixels)
    return rgb if isinstance(rgb, Reject) else normalize(rgb, out)


def pillow_rgb(sample: Sample, image_size: int, max_pixels: int) -> np.ndarray | Reject:
    """One sample's image → S×S×3 uint8 RGB, or a Reject (never raises on bad bytes). Pillow's copies are
    skipped where the pixels would not change: the EXIF rotation is applied in place, and an image
    already S×S is not resized."""
    im = open_checked(sample, max_pixels)
    if isinstance(im, Reject):
        return im
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # EXIF/ICC warnings on web images are noise, not errors
            im.draft("RGB", (image_size, image_size))
            ImageOps.exif_transpose(im, in_place=True)
            im = to_rgb(im)
            if im.size != (image_size, image_size):
                im = im.resize((image_size, image_size), Image.Resampling.BICUBIC)
            return np.asarray(im)
    except _DECODE_ERRORS as err:
        return Reject(sample.key, sample.shard, "undecodable_image", error_text(err))


class Decoder(ABC):
    """Samples → same-order list of 3×S×S tensors or Rejects."""

    image_size: int

    @abstractmethod
    def decode(self, samples: list[Sample]) -> list[torch.Tensor | Reject]: ...

    def decode_batch(self, samples: list[Sample]) -> tuple[torch.Tensor, list[int], list[Reject]]:
        """Decode and stack: (N×3×S×S batch of the decoded ones, their indices in ``samples``, rejects)."""
        return stack(self.decode(samples), self.image_size)

    def close(self) -> None:  # noqa: B027 (optional hook: a decoder without resources needs none)
        """Release threads or pipelines."""

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def stack(
    results: list[torch.Tensor | Reject], image_size: int, rows: torch.Tensor | None = None
) -> tuple[torch.Tensor, list[int], list[Reject]]:
    """Split decode results into a stacked batch, the kept indices and the rejects. ``rows``: a batch the
    results were written into, one row each; its kept rows are taken instead of stacking the results."""
    kept = [i for i, r in enumerate(results) if not isinstance(r, Reject)]
    rejects = [r for r in results if isinstance(r, Reject)]
    if rows is not None:
        return (rows if len(kept) == len(results) else rows[kept]), kept, rejects
    batch = torch.stack([results[i] for i in kept]) if kept else torch.empty(0, 3, image_size, image_size)
    return batch, kept, rejects


class PillowDecoder(Decoder):
    """Pillow in a thread pool (decode and resize release the GIL)."""

    def __init__(self, image_size: int, threads: int = 1, max_pixels: int = 89_478_485):
        self.image_size, self.max_pixels = image_size, max_pixels
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="decode") if threads > 1 else None

    def decode(self, samples: list[Sample]) -> list[torch.Tensor | Reject]:
        return self._map(lambda i: pillow_decode(samples[i], self.image_size, self.max_pixels), len(samples))

    def decode_batch(self, samples: list[Sample]) -> tuple[torch.Tensor, list[int], list[Reject]]:
        """Each image normalised straight into its row of the batch, instead of stacked afterwards (a copy
        of the whole batch: about a tenth of decoding at 64 px); rows of rejects are dropped at the end."""
        size = self.image_size
        rows = torch.empty(len(samples), 3, size, size)
        results = self._map(lambda i: pillow_decode(samples[i], size, self.max_pixels, rows[i]), len(samples))
        return stack(results, size, rows)

    def _map(self, fn, n: int) -> list:
        return list(self._pool.map(fn, range(n))) if self._pool else [fn(i) for i in range(n)]

    def close(self) -> None:
        if self._pool:
            self._pool.shutdown()


def make_decoder(run_cfg) -> Decoder:
    """The decoder a ``RunConfig`` asks for (``decoder``, ``image_size``, ``decode_threads``, ``max_pixels``).

    DALI decodes on the GPU (``mixed``) when the actor is given one (``num_gpus_per_actor > 0``).
    """
    if run_cfg.decoder == "pillow":
        return PillowDecoder(run_cfg.image_size, run_cfg.decode_threads, run_cfg.max_pixels)
    from capfilt.data.dali import DaliDecoder

    device = "mixed" if run_cfg.num_gpus_per_actor > 0 else "cpu"
    return DaliDecoder(
        run_cfg.image_size,
        device=device,
        batch_size=run_cfg.batch_size,
        threads=run_cfg.decode_threads,
        max_pixels=run_cfg.max_pixels,
    )
