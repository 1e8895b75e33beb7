"""What one bad sample costs a batch: the demo's round-0 captioner over 256 decoded demo web images, one
of which makes any batch holding it raise (before computing, as a bad input does), through
``pipeline.guarded`` as a round calls it. Run with PYTHONPATH at another checkout to time its ``guarded``.

    python docs/scripts/bad_sample_cost.py [MODELS] [REPEATS]   # default runs/demo/round-0/finetune 3
"""

import json
import sys
import time

import torch

from capfilt.config import load_config
from capfilt.data.decode import PillowDecoder
from capfilt.data.reader import ShardReader
from capfilt.run import pipeline
from capfilt.run.pipeline import decoded_batches, guarded
from capfilt.stages.captioner import Captioner

models = sys.argv[1] if len(sys.argv) > 1 else "runs/demo/round-0/finetune"
repeats = int(sys.argv[2]) if len(sys.argv) > 2 else 3
cfg = load_config("demo")
torch.set_num_threads(1)
cap = Captioner(f"{models}/captioner", cfg.caption, "cpu", cfg.run.seed)
decoder = PillowDecoder(cfg.run.image_size, 1, cfg.run.max_pixels)
batch = next(iter(decoded_batches(ShardReader("shards/web-000000.tar"), decoder, 256)))
samples, keys = batch.samples, [s.key for s in batch.samples]
bad = keys[len(keys) // 3]
calls = []


def caption(pixels, batch_keys):
    calls.append(len(batch_keys))
    if bad in batch_keys:
        raise RuntimeError("a bad sample")
    return cap.caption(pixels, batch_keys)


# checkouts before the BatchLimit (9681a92 and earlier) take neither the stage nor the limit
extra = ("caption", pipeline.BatchLimit()) if hasattr(pipeline, "BatchLimit") else ()
seconds = {"clean batch": [], "one bad sample": []}
for _ in range(repeats):
    for name, ks in (("clean batch", [k if k != bad else k + "-ok" for k in keys]), ("one bad sample", keys)):
        calls.clear()
        start = time.perf_counter()
        ok, _, rejects = guarded(caption, batch.pixels, ks, samples, "caption_failed", *extra)
        seconds[name].append(round(time.perf_counter() - start, 2))
    assert len(ok) == len(keys) - 1 and [r.key for r in rejects] == [bad], (len(ok), rejects)
print(json.dumps({"images": len(keys), "calls_with_bad_sample": len(calls), "seconds": seconds}))
