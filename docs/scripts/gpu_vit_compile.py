"""BLIP-base's ViT (384 px, bf16, batch 512, random weights) through capfilt's fused forward, eager against
``torch.compile``: images/s, TFLOP/s and the largest difference.

    python docs/scripts/gpu_vit_compile.py
"""

import dataclasses
import time

import torch
from transformers import BlipVisionModel

from capfilt.config import load_config
from capfilt.model.med import vision_config
from capfilt.model.vision import image_embeds

torch.set_grad_enabled(False)
conf = vision_config(dataclasses.replace(load_config("blip-base").model, image_size=384))
vision = BlipVisionModel(conf).cuda().bfloat16().eval()
B = 512
px = torch.randn(B, 3, 384, 384, device="cuda", dtype=torch.bfloat16)


def t(fn, n=5):
    fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / n * 1000


eager = t(lambda: image_embeds(vision, px))
flops = 2 * 86e6 * 577 * B + 12 * 4 * 577 * 577 * 768 * B
print(f"eager {eager:.1f} ms, {B / eager * 1000:.0f} images/s, {flops / eager / 1e9:.0f} TFLOP/s", flush=True)
t0 = time.perf_counter()
fn = torch.compile(image_embeds, dynamic=False)
fn(vision, px)
torch.cuda.synchronize()
print(f"compile {time.perf_counter() - t0:.1f} s", flush=True)
comp = t(lambda: fn(vision, px))
print(f"compiled {comp:.1f} ms, {B / comp * 1000:.0f} images/s, {flops / comp / 1e9:.0f} TFLOP/s", flush=True)
d = (fn(vision, px).float() - image_embeds(vision, px).float()).abs().max().item()
print(f"max abs diff {d:.3g}", flush=True)
