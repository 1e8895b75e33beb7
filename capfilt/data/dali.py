"""NVIDIA DALI decoding: the same contract and the same pixels as ``PillowDecoder``, faster on a GPU.

Pipeline: ``fn.external_source`` → ``fn.decoders.image(RGB)`` → ``fn.resize(CUBIC, S×S)`` →
``fn.crop_mirror_normalize`` (CHW float32, BLIP's mean/std). ``device="mixed"`` decodes on the GPU
(nvJPEG) and needs CUDA; ``device="cpu"`` runs anywhere (``device_id=None``). Output tensors stay
where DALI made them: on the CPU in CPU mode, like Pillow's; on the GPU in ``mixed`` mode, copied once
out of DALI's reused buffer (before, each batch went to host memory and back to the GPU for the models:
about 1.4 GB of copies per 256 images at 384 px).

DALI fails the whole batch on one corrupt image and its pipeline is unusable afterwards, so:
1. every sample is first checked with a Pillow header read (magic bytes, pixel limit): a Reject here
   costs no decode;
2. images whose pixels DALI would treat differently go to Pillow directly: alpha (DALI drops it,
   we composite on white), formats DALI does not decode (GIF, and anything not JPEG/PNG/BMP/WEBP), and
   JPEGs that do not end in the end-of-image marker: nvJPEG (``mixed``) decodes a truncated JPEG to
   partial garbage without an error, where Pillow and DALI's CPU decoder fail (seen on an H200);
   DALI applies EXIF orientation itself, and 16-bit, palette, grayscale and CMYK images decode to
   the same pixels (measured in tests/test_decode.py);
3. when a batch still fails, the pipeline is rebuilt and the batch re-run one sample at a time; a
   sample that fails alone is decoded by Pillow, whose verdict (tensor or Reject) is final. When every
   image of a batch fails alone too and Pillow decodes them all, DALI itself is not working here (a
   missing install is refused when the decoder is made): said once on stderr.
"""

from __future__ import annotations

import sys

import numpy as np
import torch

from capfilt.data.decode import MEAN, STD, Decoder, has_alpha, open_checked, pillow_decode
from capfilt.data.sample import Reject, Sample

DALI_FORMATS = {"JPEG", "PNG", "BMP", "WEBP", "MPO"}
JPEG_EOI = b"\xff\xd9"  # the end-of-image marker: a truncated JPEG lacks it


def _import_dali():
    try:
        from nvidia import dali
        from nvidia.dali import fn, types
    except ImportError as err:
        raise ImportError(
            "the DALI decoder needs NVIDIA DALI: pip install 'capfilt[dali]' "
            "(or nvidia-dali-cuda120), or set run.decoder=pillow"
        ) from err
    return dali, fn, types


class DaliDecoder(Decoder):
    """Batches through a DALI pipeline; see the module docstring for how failures are contained."""

    def __init__(
        self,
        image_size: int,
        device: str = "cpu",
        batch_size: int = 64,
        threads: int = 1,
        max_pixels: int = 89_478_485,
        device_id: int = 0,
    ):
        if device not in ("cpu", "mixed"):
            raise ValueError(f"device must be 'cpu' or 'mixed', not {device!r}")
        if device == "mixed" and not torch.cuda.is_available():
            raise RuntimeError("DALI device='mixed' decodes on a GPU, and CUDA is not available here")
        _import_dali()  # now: a missing DALI inside ``_run`` would pass for a bad batch, decoded by Pillow
        self.image_size, self.device, self.batch_size = image_size, device, batch_size
        self.threads, self.max_pixels = threads, max_pixels
        self.device_id = device_id if device == "mixed" else None
        self._pipe, self._said = None, False  # _said: whether DALI's failing here was said (_say_broken)

    def _build(self):
        dali, fn, types = _import_dali()
        s = self.image_size

        @dali.pipeline_def(
            batch_size=self.batch_size,
            num_threads=self.threads,
            device_id=self.device_id,
            prefetch_queue_depth=1,
            exec_dynamic=True,
        )
        def pipeline():
            encoded = fn.external_source(name="encoded", dtype=types.UINT8)
            img = fn.decoders.image(encoded, device=self.device, output_type=types.RGB)
            img = fn.resize(img, resize_x=s, resize_y=s, interp_type=types.INTERP_CUBIC, antialias=True)
            return fn.crop_mirror_normalize(
                img,
                dtype=types.FLOAT,
                output_layout="CHW",
                mean=[m * 255 for m in MEAN],
                std=[v * 255 for v in STD],
            )

        pipe = pipeline()
        pipe.build()
        return pipe

    def _run(self, blobs: list[bytes]) -> list[torch.Tensor]:
        """One DALI batch; on failure the pipeline is dropped (DALI marks it invalid) and we re-raise."""
        if self._pipe is None:
            self._pipe = self._build()
        try:
            self._pipe.feed_input("encoded", [np.frombuffer(b, dtype=np.uint8) for b in blobs])
            (out,) = self._pipe.run()
        except Exception:
            self._pipe = None
            raise
        if self.device == "cpu":
            return [torch.from_numpy(np.array(out[i])) for i in range(len(blobs))]
        from nvidia.dali.plugin.pytorch import feed_ndarray

        dense = out.as_tensor()  # every image is S×S, so one dense [N, 3, S, S]
        batch = torch.empty(dense.shape(), dtype=torch.float32, device=f"cuda:{self.device_id}")
        feed_ndarray(dense, batch, cuda_stream=torch.cuda.current_stream(batch.device))
        return list(batch)

    def _route(self, sample: Sample) -> Reject | str:
        """'dali', 'pillow', or the Reject a header read already proves."""
        im = open_checked(sample, self.max_pixels)
        if isinstance(im, Reject):
            return im
        if im.format in ("JPEG", "MPO") and not sample.image.rstrip(b"\0").endswith(JPEG_EOI):
            return "pillow"
        return "dali" if im.format in DALI_FORMATS and not has_alpha(im) else "pillow"

    def decode(self, samples: list[Sample]) -> list[torch.Tensor | Reject]:
        results: list[torch.Tensor | Reject | None] = [None] * len(samples)
        to_dali = []
        for i, s in enumerate(samples):
            route = self._route(s)
            if route == "dali":
                to_dali.append(i)
            else:
                results[i] = route if isinstance(route, Reject) else self._pillow(s)
        for start in range(0, len(to_dali), self.batch_size):
            chunk = to_dali[start : start + self.batch_size]
            try:
                tensors = self._run([samples[i].image for i in chunk])
            except Exception as err:
                alone = [self._one(samples[i]) for i in chunk]
                tensors = [t for t, _ in alone]
                if len(chunk) > 1 and all(rescued for _, rescued in alone):
                    self._say_broken(err, len(chunk))
            for i, t in zip(chunk, tensors):
                results[i] = t
        if self.device == "mixed":  # Pillow's fallbacks join DALI's tensors on the GPU
            results = [r.cuda(self.device_id) if isinstance(r, torch.Tensor) else r for r in results]
        return results

    def _one(self, sample: Sample) -> tuple[torch.Tensor | Reject, bool]:
        """The sample's result, and whether DALI failed it alone where Pillow decoded it."""
        try:
            return self._run([sample.image])[0], False
        except Exception:
            out = self._pillow(sample)
            return out, isinstance(out, torch.Tensor)

    def _say_broken(self, err: Exception, n: int) -> None:
        """Once per decoder: DALI failed a whole batch and then each of its images alone, all of which
        Pillow decoded. That is DALI not working here (a build, driver or memory error), not bad images:
        said, because the round goes on decoding every image with Pillow, one DALI attempt each."""
        if not self._said:
            self._said = True
            first = (str(err).splitlines() or [""])[0][:200]
            print(
                f"[capfilt] DALI ({self.device}) failed a batch of {n} and each of its images alone, which "
                f"Pillow decoded: {type(err).__name__}: {first}. Decoding goes on with Pillow; fix DALI or set "
                "run.decoder=pillow",
                file=sys.stderr,
                flush=True,
            )

    def _pillow(self, sample: Sample) -> torch.Tensor | Reject:
        return pillow_decode(sample, self.image_size, self.max_pixels)

    def close(self) -> None:
        self._pipe = None
