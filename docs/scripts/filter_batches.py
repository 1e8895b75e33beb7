"""The probes' shared input: the first demo web images of a shard at 64 px (8 batches of 64 unless told),
each image with its alt-text and one fixed synthetic caption (the shape of a round's candidates)."""

from capfilt.data.decode import PillowDecoder
from capfilt.data.reader import ShardReader
from capfilt.run.pipeline import decoded_batches

SYNTHETIC = "a small red circle to the left of a large blue square"


def filter_batches(shard: str, max_pixels: int, n: int = 8, batch_size: int = 64) -> list:
    """[(pixels, [[alt-text, synthetic], ...])] for the first ``n`` batches of ``batch_size`` of ``shard``."""
    batches = []
    for b in decoded_batches(ShardReader(shard), PillowDecoder(64, 1, max_pixels), batch_size):
        batches.append((b.pixels, [[s.caption or "image", SYNTHETIC] for s in b.samples]))
        if len(batches) == n:
            break
    return batches
