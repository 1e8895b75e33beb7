"""One ViT pass for both models on the GPU (``finetune.freeze_vision``): BLIP-base (random weights, bf16,
384 px) with the filter holding the captioner's ViT, as a frozen-ViT finetuning leaves them. Caption +
filter with each model encoding the images (two ViT passes), against one pass whose embeddings both take
(what a round's worker does once ``worker.same_vision`` finds the two equal), taking turns batch by batch;
then whether the two ways give the same captions and scores.

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
two_caps, one_caps = cap.caption(px, keys), one.caption(px, keys)
candidates = [[w, *c] for w, c in zip(web, two_caps)]
same = two_caps == one_caps and flt.score(px, candidates) == one.score(px, candidates)
print(
    json.dumps(
        {"device": device, "batch": B} | {k: round(v, 1) for k, v in rates.items()} | {"same_outputs": same}
    )
)
