"""Peak RSS of a round's worker cleaning one shard, against the shard's size in image bytes.

    python docs/scripts/shard_memory.py MODELS FOLDER [SIZES]

MODELS holds ``captioner/`` and ``filter/`` (the demo's ``runs/demo/round-0/finetune``). FOLDER gets one
shard per size (default 500,2000 samples) of web-sized JPEGs: 1024×768 noise, about 0.4 MB each, 16
distinct images repeated (each sample's bytes are read from the tar into an object of its own). Each
size runs in a fresh process: a ShardWorker (the demo config, batch 256, one thread) cleans the shard,
then the process reports its peak RSS. What a worker holds per sample shows as growth with the size.
"""

from __future__ import annotations

import io
import multiprocessing
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

DISTINCT = 16


def make_shard(path: Path, n: int) -> None:
    from capfilt.data.writer import write_tar

    rng = np.random.default_rng(0)
    images = []
    for _ in range(DISTINCT):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (768, 1024, 3), dtype=np.uint8)).save(buf, "JPEG", quality=75)
        images.append(buf.getvalue())
    members = []
    for i in range(n):
        members += [
            (f"{i:06d}.jpg", images[i % DISTINCT]),
            (f"{i:06d}.txt", b"a red circle on a blue background"),
        ]
    write_tar(str(path), members)


def clean(models: str, url: str, q) -> None:
    import torch

    torch.set_num_threads(1)
    from capfilt.config import load_config
    from capfilt.run.dispatch import RoundOutput
    from capfilt.run.worker import ShardWorker

    cfg = load_config("demo", ["filter.calibration=none"])
    worker = ShardWorker(cfg, f"{models}/captioner", f"{models}/filter", device="cpu")
    with tempfile.TemporaryDirectory() as out:
        start = time.perf_counter()
        stats = worker.run(url, "big", RoundOutput(out, cfg.filter.threshold, {"probe": "shard_memory"}))
        seconds = time.perf_counter() - start
    q.put((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, stats.n_in, seconds))


def main() -> None:
    models, folder = sys.argv[1], Path(sys.argv[2])
    sizes = [int(n) for n in (sys.argv[3] if len(sys.argv) > 3 else "500,2000").split(",")]
    folder.mkdir(parents=True, exist_ok=True)
    ctx = multiprocessing.get_context("spawn")
    for n in sizes:
        shard = folder / f"big-{n}.tar"
        if not shard.exists():
            make_shard(shard, n)
        q = ctx.Queue()
        child = ctx.Process(target=clean, args=(models, str(shard), q))
        child.start()
        child.join()
        rss, n_in, seconds = q.get()
        mb = os.path.getsize(shard) / 2**20
        print(
            f"{n} samples, shard {mb:.0f} MiB: peak RSS {rss:.1f} MiB ({n_in} in, {seconds:.1f} s)",
            flush=True,
        )


if __name__ == "__main__":
    main()
