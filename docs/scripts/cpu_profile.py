"""Where the demo models' CPU time goes: `torch.profiler` over `Captioner.caption` or `Filter.score`
(each image's alt-text and one synthetic-length caption) of 512 demo web images in batches of 256, one
thread, after one untimed pass; prints ms per image (thread CPU time) of both, then the op table.

    python docs/scripts/cpu_profile.py runs/demo/round-0/finetune shards/web-000004.tar caption|score
"""

import sys
import time

import torch
from torch.profiler import ProfilerActivity, profile

from capfilt.config import load_config
from capfilt.data import reader
from capfilt.data.decode import PillowDecoder
from capfilt.stages.captioner import Captioner
from capfilt.stages.filter import Filter

torch.set_num_threads(1)
torch.set_grad_enabled(False)
models, shard, part = sys.argv[1], sys.argv[2], sys.argv[3]
cfg = load_config("demo")
records = list(reader.ShardReader(shard))[:512]
captioner = Captioner(f"{models}/captioner", cfg.caption)
flt = Filter(f"{models}/filter", cfg.filter)
synthetic = "a small red circle to the left of a large blue square"
batches = []
for i in range(0, len(records), 256):
    pixels, kept, _ = PillowDecoder(cfg.run.image_size).decode_batch(records[i : i + 256])
    batch = [records[i + k] for k in kept]
    batches.append((pixels, [r.key for r in batch], [[r.caption or "image", synthetic] for r in batch]))


def run(which: str) -> None:
    for pixels, keys, candidates in batches:
        if which == "caption":
            captioner.caption(pixels, keys)
        else:
            flt.score(pixels, candidates)


for which in ("caption", "score"):
    run(which)
    start = time.thread_time()
    run(which)
    print(f"{which}: {(time.thread_time() - start) / len(records) * 1000:.3f} ms per image")
with profile(activities=[ProfilerActivity.CPU]) as prof:
    run(part)
print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12))
