"""What every pool of workers shares: how many fit, and the queue of shards with their retries.

The Ray pool (actors on a cluster) and the process pool (worker processes on this machine) differ in how
they start, watch and restart their workers; the shards they hand out follow one rule, kept here.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from capfilt.config import RunConfig

Job = tuple[str, str, int]  # (url, name, failed attempts so far)


@dataclass(frozen=True)
class RoundOutput:
    """What every shard of a round is written with, sent to its worker beside the shard: the folder
    (``out``), the threshold the selection keeps at, the provenance stamped on every output, and the
    round's lease (``owner``), read before each commit (None: no lease, as in a test)."""

    out: str
    threshold: float
    provenance: dict[str, Any]
    owner: str | None = None


def actors_that_fit(run: RunConfig, resources: dict[str, float]) -> int:
    """How many workers with ``run``'s per-actor CPUs and GPUs the ``resources`` (totals) hold."""
    need = {"CPU": run.num_cpus_per_actor, "GPU": run.num_gpus_per_actor}
    if not any(v > 0 for v in need.values()):
        raise ValueError("run.actors: auto needs run.num_cpus_per_actor or run.num_gpus_per_actor > 0")
    return min(int(resources.get(k, 0.0) / v + 1e-9) for k, v in need.items() if v > 0)


class ShardQueue:
    """The shards left to hand out. A failed shard goes back to the end of the queue, to another worker
    than the one it failed on when one is free, until it has failed ``max_retries`` + 1 times; then it is
    reported through ``on_failed`` and the round goes on without it.

    Re-running a shard is safe: outputs are written atomically, the done marker last, and the captions
    depend only on (seed, key, index), so a retry writes the same bytes."""

    def __init__(self, jobs: list[tuple[str, str]], max_retries: int, on_failed: Callable[[str, str], None]):
        self.jobs: deque[tuple[Job, Any]] = deque(((url, name, 0), None) for url, name in jobs)
        self.max_retries, self.on_failed = max_retries, on_failed

    def __bool__(self) -> bool:
        return bool(self.jobs)

    def take(self, free: list) -> tuple[Any, Job]:
        """The next shard and the free worker (an entry of ``free``, removed from it) to run it on."""
        job, last = self.jobs.popleft()
        worker = next((w for w in free if w is not last), free[0])
        free.remove(worker)
        return worker, job

    def failed(self, job: Job, worker: Any, error: str) -> None:
        """``job`` failed on ``worker``: queue it again, or report it when its retries are spent."""
        url, name, failures = job
        if failures < self.max_retries:
            self.jobs.append(((url, name, failures + 1), worker))
        else:
            self.on_failed(url, error)

    def fail_all(self, error: str) -> None:
        """No worker is left to run what is queued."""
        while self.jobs:
            self.on_failed(self.jobs.popleft()[0][0], error)

    def clear(self) -> None:
        """Start nothing more (the lease was lost: the job that took it over runs the rest)."""
        self.jobs.clear()


def slots(workers: Sequence, per_worker: int) -> list:
    """Each worker once per shard it can take at once."""
    return [w for w in workers for _ in range(per_worker)]
