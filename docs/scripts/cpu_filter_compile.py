"""``torch.compile`` (inductor, dynamic shapes) of the filter's text encoder and ViT at the demo's size, one
thread: the first batch (compiling included) and ``Filter.score`` time after, eager and compiled in turns.

    python docs/scripts/cpu_filter_compile.py runs/demo/round-0/finetune shards/web-000004.tar
"""

import sys
import time

import torch
from filter_batches import filter_batches  # beside this script

import capfilt.stages.filter as filter_stage
from capfilt.config import load_config
from capfilt.model.vision import image_embeds

torch.set_num_threads(1)
models, shard = sys.argv[1], sys.argv[2]
cfg = load_config("demo")
batches = filter_batches(shard, cfg.run.max_pixels)
eager = filter_stage.Filter(f"{models}/filter", cfg.filter)
compiled = filter_stage.Filter(f"{models}/filter", cfg.filter)
compiled.model.text_encoder.forward = torch.compile(compiled.model.text_encoder.forward, dynamic=True)
compiled_vit = torch.compile(image_embeds, dynamic=True)


def score(flt, px, cands):
    filter_stage.image_embeds = compiled_vit if flt is compiled else image_embeds
    return flt.score(px, cands)


start = time.perf_counter()
score(compiled, *batches[0])
print(f"first compiled batch (compiling): {time.perf_counter() - start:.1f} s")
for px, cands in batches:  # the other lengths' graphs, if any
    score(compiled, px, cands)
print(f"all 8 batches once more (recompiles for new shapes): {time.perf_counter() - start:.1f} s since start")
for _ in range(3):
    out = {}
    for name, flt in (("eager", eager), ("compiled", compiled)):
        t = time.perf_counter()
        out[name] = [itm for px, c in batches for row in score(flt, px, c) for itm, _ in row]
        print(f"{name} {(time.perf_counter() - t) * 1000 / 512:.3f} ms per image", end="; ")
    print(f"max |ITM difference| {max(abs(a - b) for a, b in zip(out['eager'], out['compiled'])):.1e}")
