"""BLIP-base's ViT (384 px, bf16, batch 512, random weights) through capfilt's fused forward, eager against
``torch.compile`` in each mode named (default: inductor's default): images/s, TFLOP/s, compile time and the
largest difference.

    python docs/scripts/gpu_vit_compile.py [MODE,...]   # e.g. default,max-autotune-no-cudagraphs
"""

import dataclasses
import os
import sys
import time

import torch
from transformers import BlipVisionModel

sys.path.insert(0, os.path.dirname(__file__))
from gpu_timing import ms

from capfilt.config import load_config
from capfilt.model.med import vision_config
from capfilt.model.vision import image_embeds

torch.set_grad_enabled(False)
conf = vision_config(dataclasses.replace(load_config("blip-base").model, image_size=384))
vision = BlipVisionModel(conf).cuda().bfloat16().eval()
B = 512
px = torch.randn(B, 3, 384, 384, device="cuda", dtype=torch.bfloat16)


eager = ms(lambda: image_embeds(vision, px))
flops = 2 * 86e6 * 577 * B + 12 * 4 * 577 * 577 * 768 * B
print(f"eager {eager:.1f} ms, {B / eager * 1000:.0f} images/s, {flops / eager / 1e9:.0f} TFLOP/s", flush=True)
for mode in (sys.argv[1] if len(sys.argv) > 1 else "default").split(","):
    torch._dynamo.reset()
    t0 = time.perf_counter()
    fn = torch.compile(image_embeds, dynamic=False, mode=mode)
    fn(vision, px)
    torch.cuda.synchronize()
    print(f"{mode}: compile {time.perf_counter() - t0:.1f} s", flush=True)
    comp = ms(lambda f=fn: f(vision, px))
    print(
        f"{mode}: {comp:.1f} ms, {B / comp * 1000:.0f} images/s, {flops / comp / 1e9:.0f} TFLOP/s", flush=True
    )
    d = (fn(vision, px).float() - image_embeds(vision, px).float()).abs().max().item()
    print(f"{mode}: max abs diff {d:.3g}", flush=True)
