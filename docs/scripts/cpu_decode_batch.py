"""Pillow's ``decode_batch`` (decode, resize, normalise into one batch tensor) of this checkout against
another checkout's ``capfilt/data/decode.py``, in one process, taking turns seven times, batches of 64, one
thread, microseconds per image: the 64 px world at 64 and 384 px, the 512 px world at 384 px. Separate
processes drifted apart by more than the difference here.

    python docs/scripts/cpu_decode_batch.py /tmp/old/capfilt/data/decode.py /tmp/world /tmp/world512
"""

import importlib.util
import statistics
import sys
import time

from capfilt.data import decode
from capfilt.data.reader import iter_shard
from capfilt.data.sample import Sample

spec = importlib.util.spec_from_file_location("old_decode", sys.argv[1])
old = importlib.util.module_from_spec(spec)
spec.loader.exec_module(old)
world, world512 = sys.argv[2:4]
for folder, size, n in ((world, 64, 1000), (world, 384, 256), (world512, 384, 256)):
    samples = [s for s in iter_shard(f"{folder}/web-000000.tar") if isinstance(s, Sample)][:n]
    decoders = {"before": old.PillowDecoder(size), "after": decode.PillowDecoder(size)}
    times: dict[str, list[float]] = {name: [] for name in decoders}
    for _ in range(7):
        for name, decoder in decoders.items():
            start = time.perf_counter()
            for i in range(0, n, 64):
                decoder.decode_batch(samples[i : i + 64])
            times[name].append((time.perf_counter() - start) * 1e6 / n)
    row = ", ".join(f"{k} min {min(v):.0f} median {statistics.median(v):.0f}" for k, v in times.items())
    print(f"{folder} -> {size} px, µs per image: {row}", flush=True)
