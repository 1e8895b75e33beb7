"""Peak RSS of a training rank against corpus size: `capfilt bench --parts memory`'s training part alone
(one pretraining epoch from a fresh MED, whose tokenizer is trained on the corpus), each size in a fresh
process, without the round's part.

    python docs/scripts/train_memory.py WORLD SIZES [--set KEY=VALUE ...]
    python docs/scripts/train_memory.py shards 10000,100000 --set model.vision_layers=1 ...
"""

import copy
import multiprocessing
import sys
import tempfile
from pathlib import Path

from capfilt.bench import _peak_rss_child, cycled_shards, fixed_threshold
from capfilt.config import load_config

if __name__ == "__main__":
    world, sizes, sets = Path(sys.argv[1]), [int(n) for n in sys.argv[2].split(",")], sys.argv[3:]
    cfg = fixed_threshold(load_config("demo", [s for s in sets if s != "--set"]))
    ctx = multiprocessing.get_context("spawn")
    with tempfile.TemporaryDirectory(prefix="capfilt-train-memory-") as tmp:
        for n in sizes:
            train = copy.deepcopy(cfg)
            train.pretrain.steps = -(-n // cfg.pretrain.batch_size)  # one epoch
            train.pretrain.checkpoint_every = train.pretrain.steps
            q = ctx.Queue()
            shards = cycled_shards(world, n, Path(tmp) / f"corpus-{n}")
            child = ctx.Process(
                target=_peak_rss_child, args=("train", train, shards, None, f"{tmp}/train-{n}", q)
            )
            child.start()
            child.join()
            if child.exitcode != 0:
                sys.exit(f"training at {n} images failed ({child.exitcode})")
            print(f"{n} images: peak RSS {q.get():.1f} MiB", flush=True)
