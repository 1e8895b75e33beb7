"""What reading and decoding beside the models cost an actor's model time on the CPU, one thread each.

Caption + score of demo web images (batches of 256, the round-0 models), timed per image:
- ``busy``: the model alone, then with a thread that reads and decodes shards without pause (it shares
  the model thread's GIL), then with a process doing the same (no shared GIL); the second core is free;
- ``round``: batches decoded beforehand, against batches from the round's read-ahead thread
  (``prefetch(decoded_batches(...))``, two batches ahead, as ``process_shard`` reads them);
- ``pair``: run it twice at once (two shells) to see what a second actor on the other core costs.

    python docs/scripts/cpu_read_ahead.py busy|round|pair runs/demo/round-0/finetune shards
"""

import multiprocessing as mp
import sys
import threading

import torch

from capfilt.config import load_config
from capfilt.data.decode import PillowDecoder
from capfilt.data.reader import ShardReader
from capfilt.run.pipeline import decoded_batches, score_batch
from capfilt.run.prefetch import prefetch
from capfilt.stages.captioner import Captioner
from capfilt.stages.filter import Filter

torch.set_num_threads(1)
mode, models, world = sys.argv[1:4]
cfg = load_config("demo")
cap = Captioner(f"{models}/captioner", cfg.caption, "cpu", cfg.run.seed)
flt = Filter(f"{models}/filter", cfg.filter)
shards = [f"{world}/web-000003.tar", f"{world}/web-000004.tar"]


def batches(url: str):
    return decoded_batches(ShardReader(url), PillowDecoder(cfg.run.image_size), 256)


def model_ms(source) -> float:
    """Caption + score milliseconds per image over ``source``'s batches."""
    timings, n = {}, 0
    for batch in source:
        if batch.samples:
            score_batch(batch, cap, flt, 0.5, timings)
            n += len(batch.samples)
    return (timings["caption"] + timings["score"]) * 1000 / n


def read_forever(stop) -> None:
    while not stop.is_set():
        for _ in batches(shards[0]):
            if stop.is_set():
                break


decoded = [b for url in shards for b in batches(url)]
model_ms(decoded[:1])  # warm-up
for _ in range(3):
    if mode == "busy":
        alone = model_ms(decoded)
        for label, start in (("thread", threading.Thread), ("process", mp.get_context("fork").Process)):
            stop = threading.Event() if label == "thread" else mp.get_context("fork").Event()
            worker = start(target=read_forever, args=(stop,))
            worker.start()
            beside = model_ms(decoded)
            stop.set()
            worker.join()
            print(f"alone {alone:.2f} ms per image, beside a reading {label} {beside:.2f}", flush=True)
    elif mode == "round":
        before = model_ms(decoded)
        ahead = model_ms(b for url in shards for b in prefetch(batches(url), 2))
        print(f"decoded before {before:.2f} ms per image, read-ahead thread {ahead:.2f}", flush=True)
    else:
        print(f"model {model_ms(decoded):.2f} ms per image", flush=True)
