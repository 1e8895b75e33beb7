"""A worker's build (what a Ray actor does before its first shard: import, load captioner, filter and
decoder) in a fresh process, one thread, for the model folders given; prints the seconds of each part.

    python docs/scripts/worker_build.py CAPTIONER FILTER

Run it from a worktree on PYTHONPATH (not from the repository as cwd) to compare two commits.
"""

import json
import sys
import time
from pathlib import Path

start = time.perf_counter()
import torch  # noqa: E402

torch.set_num_threads(1)
from capfilt.config import load_config  # noqa: E402
from capfilt.run.worker import ShardWorker  # noqa: E402

imported = time.perf_counter()
size = json.loads((Path(sys.argv[1]) / "config.json").read_text())["vision_config"]["image_size"]
worker = ShardWorker(load_config("demo", [f"run.image_size={size}"]), sys.argv[1], sys.argv[2], device="cpu")
built = time.perf_counter()
print(f"import {imported - start:.2f} s, models {built - imported:.2f} s", flush=True)
