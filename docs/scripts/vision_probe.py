"""Can the demo's vision encoder learn what the captions state? A supervised probe (docs/RESULTS.md).

Trains the demo's ViT (configs/demo.yaml, one thread) from scratch with the truth labels of the web split
(shape, size and colour of object 0, object count, relation), with the pretraining augmentation, then
reports test-split accuracy. Labels are truth, so this bounds what any caption objective can get from
the same steps; it is a diagnosis, never a recipe. ``patch=0`` swaps in a small CNN (4 stride-2 3x3
convolutions) to show whether the images carry the information.

    OMP_NUM_THREADS=1 python docs/scripts/vision_probe.py IMAGE_SIZE PATCH STEPS [LR [OUT]]

With OUT the trained ViT is saved there (``save_pretrained``), a folder ``model.vision_init`` takes: the
oracle start of RESULTS.md, which tells how far a vision encoder that sees shapes would carry the demo.
"""

import glob
import io
import json
import sys
import time

import numpy as np
import pyarrow.parquet as pq
import torch
from PIL import Image
from torch import nn
from transformers.models.blip.modeling_blip import BlipVisionModel

from capfilt.config import load_config
from capfilt.data.decode import normalize
from capfilt.data.reader import iter_shard
from capfilt.data.synth import COLORS, RELATIONS, SHAPES
from capfilt.model.med import vision_config
from capfilt.train.data import random_resized_crop

size, patch, steps = (int(a) for a in sys.argv[1:4])
lr = float(sys.argv[4]) if len(sys.argv) > 4 else 1e-3
out = sys.argv[5] if len(sys.argv) > 5 else None
torch.manual_seed(0)
rng = np.random.default_rng(0)
scenes = {
    r["key"]: json.loads(r["scene"])
    for r in pq.read_table("shards/truth.parquet", columns=["key", "scene"]).to_pylist()
}
TASKS = {"shape": 5, "size": 2, "colour": 8, "objects": 2, "relation": 5}
RELATION = [None, *RELATIONS]


def labels(scene: dict) -> list[int]:
    o = scene["objects"][0]
    return [
        SHAPES.index(o["shape"]),
        ["small", "large"].index(o["size"]),
        list(COLORS).index(o["color"]),
        len(scene["objects"]) - 1,
        RELATION.index(scene["relation"]),
    ]


def load(pattern: str) -> tuple[list[Image.Image], torch.Tensor]:
    images, ys = [], []
    for url in sorted(glob.glob(pattern)):
        for sample in iter_shard(url):
            images.append(Image.open(io.BytesIO(sample.image)).convert("RGB"))
            ys.append(labels(scenes[sample.key]))
    return images, torch.tensor(ys)


class CNN(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        c = [3, 32, 64, width, width]
        layers = [[nn.Conv2d(c[i], c[i + 1], 3, 2, 1), nn.BatchNorm2d(c[i + 1]), nn.ReLU()] for i in range(4)]
        self.net = nn.Sequential(*sum(layers, []), nn.AdaptiveAvgPool2d(1), nn.Flatten())

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.net(pixels)


cfg = load_config("demo", [f"model.image_size={size}", f"model.patch_size={patch or 16}"]).model
if patch:
    vit = BlipVisionModel(vision_config(cfg))
    encoder = lambda pixels: vit(pixel_values=pixels).pooler_output  # noqa: E731 (post-LayerNorm [CLS])
    body = vit
else:
    body = encoder = CNN(cfg.vision_width)
head = nn.Linear(cfg.vision_width, sum(TASKS.values()))
params = [*body.parameters(), *head.parameters()]
opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.05)
warmup = 30
sched = torch.optim.lr_scheduler.LambdaLR(
    opt, lambda s: min(1, (s + 1) / warmup) * 0.5 * (1 + np.cos(np.pi * s / steps))
)
train_images, train_y = load("shards/web-*.tar")
test_images, test_y = load("shards/test-*.tar")
start = time.time()
for step in range(steps):
    idx = rng.integers(len(train_images), size=64)
    pixels = torch.stack(
        [normalize(np.asarray(random_resized_crop(train_images[i], size, (0.8, 1.0), rng))) for i in idx]
    )
    logits = head(encoder(pixels)).split(list(TASKS.values()), dim=1)
    losses = [nn.functional.cross_entropy(out, train_y[idx, j]) for j, out in enumerate(logits)]
    opt.zero_grad()
    sum(losses).backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    sched.step()
    if step % 250 == 0 or step == steps - 1:
        print(step, {t: round(v.item(), 3) for t, v in zip(TASKS, losses)}, flush=True)
seconds = time.time() - start
body.eval()
if out and patch:
    vit.save_pretrained(out)
with torch.no_grad():
    pixels = torch.stack(
        [normalize(np.asarray(im.resize((size, size), Image.BICUBIC))) for im in test_images]
    )
    predicted = [out.argmax(1) for out in head(encoder(pixels)).split(list(TASKS.values()), dim=1)]
one, two = test_y[:, 3] == 0, test_y[:, 3] == 1
accuracy = {t: (p == test_y[:, j]).float().mean().item() for j, (t, p) in enumerate(zip(TASKS, predicted))}
accuracy["shape, one object"] = (predicted[0][one] == test_y[one, 0]).float().mean().item()
accuracy["relation, two objects"] = (predicted[4][two] == test_y[two, 4]).float().mean().item()
print(f"{'vit' if patch else 'cnn'} size {size} patch {patch} steps {steps} lr {lr}: {seconds:.0f} s")
print(json.dumps({k: round(v, 3) for k, v in accuracy.items()}))
