"""GPU check of the fixed-shape sampler (issue 10): CUDA graph vs eager tokens, and captioner/filter
images/s against the sampler of commit 738503e (HF modules step by step) and the batched HF script.

    git show 738503e:capfilt/stages/captioner.py > docs/scripts/old_captioner.py
    python docs/scripts/gpu_sampler.py blip-base cuda 64,256,512 1024 [out.json]
"""

import dataclasses
import json
import os
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))
from old_captioner import Captioner as OldCaptioner

from capfilt.config import load_config
from capfilt.run import bench
from capfilt.run.hf_script import HFScript
from capfilt.stages.captioner import Captioner
from capfilt.stages.filter import Filter

cfg_name, device, sizes, n_img = (
    sys.argv[1],
    sys.argv[2],
    [int(x) for x in sys.argv[3].split(",")],
    int(sys.argv[4]),
)
cfg = load_config(cfg_name)
dtype = "bfloat16" if device == "cuda" else "float32"
size = cfg.run.image_size
tmp = tempfile.mkdtemp()
words = "a red green blue small large circle square triangle near the left right of on with".split()
caps_text = [" ".join(words[(i * 7 + j * 3) % len(words)] for j in range(8)) for i in range(300)]
cap_path, flt_path = bench.random_models(dataclasses.replace(cfg.model, image_size=size), tmp, caps_text)
g = torch.Generator().manual_seed(0)
pixels = torch.randn(n_img, 3, size, size, generator=g).to(device)
keys = [f"k{i}" for i in range(n_img)]
web = [caps_text[i % 300] for i in range(n_img)]
out = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "rows": []}


def rate(fn, bs):
    fn(pixels[:bs], keys[:bs])  # warm-up (captures the graphs)
    if device == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    for i in range(0, n_img, bs):
        fn(pixels[i : i + bs], keys[i : i + bs])
    if device == "cuda":
        torch.cuda.synchronize()
    return n_img / (time.perf_counter() - t)


def two(ks):
    """Each image's web caption and one synthetic-length caption."""
    return [[w, "a small red circle near a big square"] for w in web[: len(ks)]]


# 1. tokens: graph vs eager, with a captioner biased to write [SEP] so rows finish at different steps
new = Captioner(cap_path, cfg.caption, device, 0, dtype)
with torch.no_grad():
    new.model.text_decoder.cls.predictions.decoder.bias[new.eos] += 3.0
new_e = Captioner(cap_path, cfg.caption, device, 0, dtype)
new_e.sampler.graphed = False
with torch.no_grad():
    new_e.model.text_decoder.cls.predictions.decoder.bias[new_e.eos] += 3.0
bs = min(64, n_img)
a, b = new.caption(pixels[:bs], keys[:bs]), new_e.caption(pixels[:bs], keys[:bs])
lens = [len(c[0].split()) for c in a]
out["graph_vs_eager_identical"] = sum(x == y for x, y in zip(a, b)) / bs
out["caption_words_min_max"] = [min(lens), max(lens)]
parts = []
for i in range(0, bs, 7):
    parts += new.caption(pixels[i : i + 7], keys[i : i + 7])
out["batch7_vs_64_identical"] = sum(x == y for x, y in zip(parts, a)) / bs
print(json.dumps(out), flush=True)
del new, new_e

# 2. throughput, random weights (captions run to max_length)
cap = Captioner(cap_path, cfg.caption, device, 0, dtype)
eager = Captioner(cap_path, cfg.caption, device, 0, dtype)
eager.sampler.graphed = False
old = OldCaptioner(cap_path, cfg.caption, device, 0, dtype)
flt = Filter(flt_path, cfg.filter, device, dtype)
script = HFScript(cfg, cap_path, flt_path, device, dtype)
for bs in sizes:
    row = {"batch": bs}
    for name, c in (
        ("sampler", cap),
        ("sampler_eager", eager),
        ("head_sampler", old),
        ("hf_generate", script),
    ):
        if name == "sampler_eager" and device != "cuda":
            continue
        row[name] = round(rate(c.caption, bs), 1)
    row["filter"] = round(rate(lambda px, ks: flt.score(px, two(ks)), bs), 1)
    row["hf_itm"] = round(rate(lambda px, ks: script.score(px, two(ks)), bs), 1)
    out["rows"].append(row)
    print(json.dumps(row), flush=True)
if len(sys.argv) > 5:
    json.dump(out, open(sys.argv[5], "w"), indent=1)
