"""What reading a shard not in key order costs: seconds and peak RSS of the reader alone.

    python docs/scripts/unordered_read.py SHARD [SIZE]

SHARD: a shard in key order (the demo's ``shards/web-000000.tar``). Its files are written again in a random
order (a tar of a folder made without ``--sort=name``), and also a shard of SIZE (default 1000) samples of
web-sized JPEGs (1024×768 noise, about 0.4 MB each) in key order and scrambled. For each, in a fresh
process: the streamed read of the shard in key order, the grouped read of it, and ``read_shard`` of the
scrambled copy (a streamed read that stops at the first key seen again, then the grouped read), each
reading every sample's bytes; the best of three runs, and the process's peak RSS.
"""

from __future__ import annotations

import io
import multiprocessing
import random
import resource
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image


def scramble(src: str, dst: str) -> None:
    from capfilt.data.writer import write_tar

    with tarfile.open(src) as tar:
        members = [(m.name, tar.extractfile(m).read()) for m in tar.getmembers() if m.isfile()]
    random.Random(0).shuffle(members)
    write_tar(dst, members)


def web_shard(path: str, n: int) -> None:
    from capfilt.data.writer import write_tar

    rng = np.random.default_rng(0)
    images = []
    for _ in range(16):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (768, 1024, 3), dtype=np.uint8)).save(buf, "JPEG", quality=75)
        images.append(buf.getvalue())
    members = []
    for i in range(n):
        members += [(f"{i:06d}.jpg", images[i % 16]), (f"{i:06d}.txt", b"a red circle on a blue background")]
    write_tar(path, members)


def measure(url: str, how: str, q) -> None:
    from capfilt.data.reader import ShardReader, read_shard

    def consume(reader) -> tuple[int, bool]:
        return sum(len(getattr(item, "image", b"")) > 0 for item in reader), reader.grouped

    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        if how == "read_shard":
            n, grouped = read_shard(url, consume)
        else:
            n, grouped = consume(ShardReader(url, grouped=how == "grouped"))
        best = min(best, time.perf_counter() - start)
    q.put((n, grouped, best, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024))


def run(ctx, target, *args) -> None:
    p = ctx.Process(target=target, args=args)
    p.start()
    p.join()


def main() -> None:
    src, size = sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 1000
    ctx = multiprocessing.get_context("spawn")
    with tempfile.TemporaryDirectory() as tmp:
        web = f"{tmp}/web.tar"
        run(ctx, web_shard, web, size)  # in processes of their own: a child starts at its parent's peak RSS
        for name, ordered in ((Path(src).name, src), (f"web-sized x{size}", web)):
            scrambled = f"{tmp}/scrambled.tar"
            run(ctx, scramble, ordered, scrambled)
            mib = Path(ordered).stat().st_size / 2**20
            for how, url in (("streamed", ordered), ("grouped", ordered), ("read_shard", scrambled)):
                q = ctx.Queue()
                p = ctx.Process(target=measure, args=(url, how, q))
                p.start()
                n, grouped, seconds, rss = q.get()
                p.join()
                label = f"{how} of the scrambled copy" if how == "read_shard" else f"{how}, in key order"
                print(
                    f"{name} ({mib:.0f} MiB): {label}: {n} samples, grouped={grouped}, {seconds:.3f} s, "
                    f"peak RSS {rss:.0f} MiB",
                    flush=True,
                )


if __name__ == "__main__":
    main()
