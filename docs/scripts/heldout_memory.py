"""Peak RSS and seconds of loading a held-out split whole, as eval and the calibration do.

    python docs/scripts/heldout_memory.py IMAGE_SIZE SHARD...

Prints the images loaded, the seconds and the process's peak RSS (torch imported, so its floor is in it).
"""

from __future__ import annotations

import resource
import sys
import time

from capfilt.config import RunConfig
from capfilt.eval.heldout import load_heldout

if __name__ == "__main__":
    start = time.perf_counter()
    held = load_heldout(sys.argv[2:], RunConfig(image_size=int(sys.argv[1])))
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"{len(held.keys)} images, {time.perf_counter() - start:.1f} s, peak RSS {peak_mb:.0f} MB")
