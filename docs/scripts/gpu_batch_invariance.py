"""Does a sample get the same captions and scores whatever batch it rides in, on this device and dtype?

The sampler draws each row from its own stream (seeded by the sample's key), so on the CPU a sample's
captions are the same bytes at batch 1, 7 and 64 (tests/test_sampler.py). On a GPU the matrix products
may pick other kernels for other shapes, which moves the logits by rounding; a draw near a token's
boundary then takes the next token. This counts, for the first 64 images, how many got other captions
(and the largest ITM and ITC change of the same candidates) at batch 512, 7 and 1 against batch 64.

    python docs/scripts/gpu_batch_invariance.py MODELS [SHARD] [DEVICE]
      MODELS: a folder with captioner/ and filter/ (the demo's, with the demo world's SHARD), or
      "random" (BLIP-base with random weights at 384 px, random pixels)
"""

import dataclasses
import json
import sys
import tempfile
from pathlib import Path

import torch

from capfilt.config import load_config
from capfilt.data.decode import PillowDecoder
from capfilt.data.reader import ShardReader
from capfilt.run import bench
from capfilt.run.pipeline import decoded_batches
from capfilt.stages.captioner import Captioner
from capfilt.stages.filter import Filter

torch.set_grad_enabled(False)
models, device = sys.argv[1], sys.argv[3] if len(sys.argv) > 3 else "cuda"
N, SIZES = 64, (512, 7, 1)
if models == "random":
    cfg = load_config("blip-base")
    size = cfg.run.image_size
    words = "a red green blue small large circle square near the left right of on with".split()
    web = [" ".join(words[(i * 7 + j * 3) % len(words)] for j in range(8)) for i in range(512)]
    cap_path, flt_path = bench.random_models(
        dataclasses.replace(cfg.model, image_size=size), tempfile.mkdtemp(), web
    )
    pixels = torch.randn(512, 3, size, size, generator=torch.Generator().manual_seed(1))
    keys = [f"k{i:04d}" for i in range(512)]
else:
    cfg = load_config("demo")
    cap_path, flt_path = str(Path(models, "captioner")), str(Path(models, "filter"))
    decoder = PillowDecoder(cfg.run.image_size, 1, cfg.run.max_pixels)
    batch = next(iter(decoded_batches(ShardReader(sys.argv[2]), decoder, 512)))
    pixels, keys, web = batch.pixels, [s.key for s in batch.samples], [s.caption for s in batch.samples]


def in_batches(fn, n: int, bs: int) -> list:
    """``fn(start, stop)`` over the first ``n`` images in batches of ``bs``, the results joined."""
    return [r for i in range(0, n, bs) for r in fn(i, min(i + bs, n))]


def measure(dtype: str) -> dict:
    """Each batch size's differences from batch N, in ``dtype``."""
    cap = Captioner(cap_path, cfg.caption, device, cfg.run.seed, dtype)
    flt = Filter(flt_path, cfg.filter, device, dtype)
    px = pixels.to(device, getattr(torch, dtype))

    def captions(i, j):
        return cap.caption(px[i:j], keys[i:j])

    ref = in_batches(captions, N, N)
    cands = [[w, *c] for w, c in zip(web, ref)] + [[w] for w in web[N:]]  # past N, the web caption alone

    def scores(i, j):
        return flt.score(px[i:j], cands[i:j])

    ref_scores, rows = in_batches(scores, N, N), {}
    for bs in SIZES:
        n = max(N, bs)
        row = {"images_other_captions": sum(a != b for a, b in zip(ref, in_batches(captions, n, bs)[:N]))}
        if bs > 1:
            pairs = [(x, y) for a, b in zip(ref_scores, in_batches(scores, n, bs)[:N]) for x, y in zip(a, b)]
            row |= {
                "max_itm_diff": max(abs(x[0] - y[0]) for x, y in pairs),
                "max_itc_diff": max(abs(x[1] - y[1]) for x, y in pairs),
            }
        rows[f"{dtype}, batch {bs} against {N}"] = row
    return rows


report = {"models": models, "device": device, "images": N}
for dtype in ("bfloat16", "float32"):
    report |= measure(dtype)
print(json.dumps(report, indent=1))
