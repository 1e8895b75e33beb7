"""One ViT pass for both models on the GPU (``finetune.freeze_vision``): BLIP-base (random weights, bf16,
384 px) with the filter holding the captioner's ViT, as a frozen-ViT finetuning leaves them. Caption +
filter with each model encoding the images (two ViT passes), against one pass whose embeddings both take
(what a round's worker does once ``worker.same_vision`` finds the two equal), taking turns batch by batch;
then whether the two ways give the same captions and scores, and where they part if they do not: each
way run twice (is it deterministic at all?), the two models' ViT embeddings of the same pixels, and
captions and scores apart (for each comparison: how many of one batch's images got other captions, and
the largest ITM and ITC difference over the same candidates).

    python docs/scripts/gpu_shared_vit.py [BATCH] [DEVICE]   # default 512 cuda
"""

import dataclasses
import json
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from capfilt.config import load_config
from capfilt.run import bench
from capfilt.run.worker import same_vision
from capfilt.stages.captioner import Captioner
from capfilt.stages.filter import Filter

torch.set_grad_enabled(False)
B = int(sys.argv[1]) if len(sys.argv) > 1 else 512
device = sys.argv[2] if len(sys.argv) > 2 else "cuda"
cfg, dtype = (
    load_config("blip-base" if device == "cuda" else "tiny"),
    "bfloat16" if device == "cuda" else "float32",
)
size = cfg.run.image_size
words = "a red green blue small large circle square triangle near the left right of on with".split()
texts = [" ".join(words[(i * 7 + j * 3) % len(words)] for j in range(8)) for i in range(300)]
cap_path, flt_path = bench.random_models(
    dataclasses.replace(cfg.model, image_size=size), tempfile.mkdtemp(), texts
)
vit = {
    k: v for k, v in load_file(Path(cap_path) / "model.safetensors").items() if k.startswith("vision_model.")
}
save_file(load_file(Path(flt_path) / "model.safetensors") | vit, Path(flt_path) / "model.safetensors")
cap, flt = Captioner(cap_path, cfg.caption, device, 0, dtype), Filter(flt_path, cfg.filter, device, dtype)
assert same_vision(cap, flt)


class Two:
    """Each model encoding the images itself (two ViT passes), as without a shared ViT."""

    def caption(self, pixels, keys):
        return cap.caption(pixels, keys)

    def score(self, pixels, captions):
        return flt.score(pixels, captions)


class OnePass:
    """The captioner's ViT pass, its embeddings taken by the filter too (``pipeline.score_batch``)."""

    def caption(self, pixels, keys):
        self.embeds = cap.encode(pixels)
        return cap.caption_embeds(self.embeds, keys)

    def score(self, pixels, captions):
        return flt.score_embeds(self.embeds, captions)


pixels = torch.randn(4 * B, 3, size, size, generator=torch.Generator().manual_seed(1)).to(
    device, getattr(torch, dtype)
)
batches = [
    (pixels[i : i + B], [f"k{j}" for j in range(i, i + B)], [texts[j % 300] for j in range(i, i + B)])
    for i in range(0, 4 * B, B)
]
one = OnePass()
rates = bench.model_images_per_s({"two ViT passes": (cap, flt), "one ViT pass": (one, one)}, batches)
px, keys, web = batches[0]
candidates = [[w, *c] for w, c in zip(web, cap.caption(px, keys))]  # the same candidates for every run


def outputs(way) -> tuple[list, list]:
    """One batch's captions, and the scores of the same candidates, by ``way``."""
    caps = way.caption(px, keys)
    return caps, way.score(px, candidates)


def apart(a, b) -> dict:
    """How two runs' outputs differ: images with other captions, the largest ITM and ITC difference."""
    pairs = [(x, y) for sa, sb in zip(a[1], b[1]) for x, y in zip(sa, sb)]
    return {
        "images_other_captions": sum(x != y for x, y in zip(a[0], b[0])),
        "max_itm_diff": max(abs(x[0] - y[0]) for x, y in pairs),
        "max_itc_diff": max(abs(x[1] - y[1]) for x, y in pairs),
    }


two = [outputs(Two()), outputs(Two())]
shared = [outputs(one), outputs(one)]
embeds = [cap.encode(px), cap.encode(px), flt.encode(px)]
report = {
    "two passes, run twice": apart(*two),
    "one pass, run twice": apart(*shared),
    "two passes against one": apart(two[0], shared[0]),
    "ViT embeddings, captioner twice: max diff": (embeds[0] - embeds[1]).abs().max().item(),
    "ViT embeddings, captioner against filter: max diff": (embeds[0] - embeds[2]).abs().max().item(),
}
same = two[0] == shared[0]
rounded = {k: round(v, 1) for k, v in rates.items()}
print(
    json.dumps({"device": device, "batch": B} | rounded | {"same_outputs": same, "apart": report}, indent=1)
)
