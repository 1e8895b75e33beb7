"""What one ViT pass for both models would give (the lever after FP8, docs/BENCHMARKS.md): caption + filter
at BLIP-base size (random weights, bf16, 384 px) with each model's own ViT, against the filter taking the
captioner's image embeddings instead of encoding the images again, the two taking turns batch by batch.
A timing bound only: the filter's heads on the captioner's embeddings score nothing meaningful.

    python docs/scripts/gpu_shared_vit.py [BATCH]   # default 512
"""

import dataclasses
import json
import sys
import tempfile

import torch
import torch.nn.functional as F

import capfilt.stages.captioner as captioner_module
from capfilt.config import load_config
from capfilt.run import bench
from capfilt.stages.captioner import Captioner
from capfilt.stages.filter import Filter

torch.set_grad_enabled(False)
cfg = load_config("blip-base")
B, size = int(sys.argv[1]) if len(sys.argv) > 1 else 512, cfg.run.image_size
words = "a red green blue small large circle square triangle near the left right of on with".split()
texts = [" ".join(words[(i * 7 + j * 3) % len(words)] for j in range(8)) for i in range(300)]
cap_path, flt_path = bench.random_models(
    dataclasses.replace(cfg.model, image_size=size), tempfile.mkdtemp(), texts
)
last = {}
encode = captioner_module.image_embeds


def kept_embeds(vision, pixels):
    """The captioner's ViT pass, its output kept for the filter."""
    last["embeds"] = encode(vision, pixels)
    return last["embeds"]


captioner_module.image_embeds = kept_embeds


class OneViTFilter(Filter):
    def encode_images(self, pixels):
        embeds = last["embeds"]
        return embeds, F.normalize(self.model.vision_proj(embeds[:, 0]), dim=-1)


pixels = torch.randn(4 * B, 3, size, size, generator=torch.Generator().manual_seed(1)).cuda().bfloat16()
batches = [
    (pixels[i : i + B], [f"k{j}" for j in range(i, i + B)], [texts[j % 300] for j in range(i, i + B)])
    for i in range(0, 4 * B, B)
]
pairs = {
    "two ViT passes": (
        Captioner(cap_path, cfg.caption, "cuda", 0, "bfloat16"),
        Filter(flt_path, cfg.filter, "cuda", "bfloat16"),
    ),
    "one ViT pass": (
        Captioner(cap_path, cfg.caption, "cuda", 0, "bfloat16"),
        OneViTFilter(flt_path, cfg.filter, "cuda", "bfloat16"),
    ),
}
rates = bench.model_images_per_s(pairs, batches)
print(
    json.dumps(
        {"device": torch.cuda.get_device_name(), "batch": B} | {k: round(v, 1) for k, v in rates.items()}
    )
)
