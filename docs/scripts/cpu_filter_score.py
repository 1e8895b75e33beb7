"""`Filter.score` alone at the demo's size, one thread: 1,024 web images of a shard in batches of 256 (the
demo round's batch), each with its alt-text and one synthetic caption; three timed passes after a warm-up.
Run it with two checkouts on ``PYTHONPATH`` in turns to compare them.

    python docs/scripts/cpu_filter_score.py runs/demo/round-0/finetune shards/web-000004.tar
"""

import sys
import time

import torch
from filter_batches import filter_batches  # beside this script

from capfilt.config import load_config
from capfilt.stages.filter import Filter

torch.set_num_threads(1)
models, shard = sys.argv[1], sys.argv[2]
cfg = load_config("demo")
batches = filter_batches(shard, cfg.run.max_pixels, n=4, batch_size=256)
flt = Filter(f"{models}/filter", cfg.filter)
flt.score(*batches[0])
images = sum(len(px) for px, _ in batches)
passes = []
for _ in range(3):
    start = time.perf_counter()
    for px, cands in batches:
        flt.score(px, cands)
    passes.append(f"{(time.perf_counter() - start) * 1000 / images:.3f}")
print("Filter.score, ms per image:", " / ".join(passes))
