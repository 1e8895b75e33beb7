"""Caption + filter images/s of one process at a given torch thread count (docs/BENCHMARKS.md, 'Two actors
of one core each'). Run two at once with THREADS=1 to see what two one-core actors do together.

THREADS=2 python docs/scripts/cpu_threads.py runs/demo/round-0/finetune shards/web-000004.tar
"""

import os
import sys
import time

import torch

from capfilt.config import load_config
from capfilt.data import reader
from capfilt.data.decode import PillowDecoder
from capfilt.stages.captioner import Captioner
from capfilt.stages.filter import Filter

torch.set_num_threads(int(os.environ.get("THREADS", "2")))
models, shard = sys.argv[1], sys.argv[2]
cfg = load_config("demo")
records = list(reader.ShardReader(shard))[:512]
pixels, kept, _ = PillowDecoder(cfg.run.image_size).decode_batch(records)
records = [records[i] for i in kept]
captioner = Captioner(f"{models}/captioner", cfg.caption)
filter_ = Filter(f"{models}/filter", cfg.filter)
bs = cfg.run.batch_size
captioner.caption(pixels[:bs], [r.key for r in records[:bs]])  # warm-up
start = time.perf_counter()
for s in range(0, len(records), bs):
    caps = captioner.caption(pixels[s : s + bs], [r.key for r in records[s : s + bs]])
    filter_.score(pixels[s : s + bs], [[r.caption, *c] for r, c in zip(records[s : s + bs], caps)])
print(f"{torch.get_num_threads()} threads: {len(records) / (time.perf_counter() - start):.0f} images/s")
