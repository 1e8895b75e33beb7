"""Reading one demo shard's tar (``ShardReader``, no decoding) and writing its round outputs
(``write_round_shard``: tar, two Parquet files, stats, done marker), best of 5, milliseconds.
Run it with two checkouts on ``PYTHONPATH`` in turns to compare them.

    python docs/scripts/tar_io.py shards/web-000004.tar
"""

import sys
import tempfile
import time

from capfilt.data import writer
from capfilt.data.reader import ShardReader
from capfilt.data.sample import Candidate, Reject
from capfilt.run.pipeline import shard_stats
from capfilt.stages.select import decide

url = sys.argv[1]
records = list(ShardReader(url))
rejects = [r for r in records if isinstance(r, Reject)]
results = [
    decide(
        s, [Candidate(s.caption, "web", 0.6, 0.3), Candidate("a dog on a mat", "synthetic", 0.7, 0.3)], 0.5
    )
    for s in records
    if not isinstance(s, Reject)
]
stats = shard_stats(url, results, rejects, len(records), False)
out = tempfile.mkdtemp()
read, write = [], []
for i in range(5):
    start = time.perf_counter()
    list(ShardReader(url, fingerprint=True))  # as a round reads it
    read.append(time.perf_counter() - start)
    start = time.perf_counter()
    writer.write_round_shard(out, f"w{i}", results, stats, {"probe": 1})
    write.append(time.perf_counter() - start)
print(f"read {min(read) * 1000:.1f} ms, write {min(write) * 1000:.1f} ms")
