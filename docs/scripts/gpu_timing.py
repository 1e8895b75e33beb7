"""Milliseconds per call on the GPU, for the probes beside this file."""

import time

import torch


def ms(fn, n: int = 5) -> float:
    """Mean wall milliseconds of ``n`` calls of ``fn`` after one warm-up call, the GPU synchronised before
    and after them (kernels run asynchronously, so the clock alone would time their launch)."""
    fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(n):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / n * 1000
