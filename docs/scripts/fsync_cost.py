"""What flushing a round shard's files to the disk costs: one committed shard's five files (tar, both
Parquet files, stats, done marker) written again through ``writer.atomic_open``, with ``os.fsync`` real and
as a no-op, taking turns, 20 times each; the median, fastest and slowest, in ms.

    python docs/scripts/fsync_cost.py RUN_FOLDER   # a round's output folder (its web-000000.* files)
"""

import glob
import os
import statistics
import sys
import tempfile
import time

from capfilt.data.writer import atomic_open

files = {os.path.basename(p): open(p, "rb").read() for p in sorted(glob.glob(f"{sys.argv[1]}/web-000000.*"))}
real, times = os.fsync, {"fsync": [], "none": []}
with tempfile.TemporaryDirectory(dir=".") as tmp:  # the disk the outputs go to, not a tmpfs
    for i in range(20):
        for mode, times_ in times.items():
            os.fsync = real if mode == "fsync" else (lambda fd: None)
            t0 = time.perf_counter()
            for name, data in files.items():
                with atomic_open(f"{tmp}/{mode}-{i}/{name}") as f:
                    f.write(data)
            times_.append(time.perf_counter() - t0)
os.fsync = real
for mode, t in times.items():
    print(f"{mode}: {statistics.median(t) * 1e3:.1f} ms (min {min(t) * 1e3:.1f}, max {max(t) * 1e3:.1f})")
print({name: len(data) for name, data in files.items()})
