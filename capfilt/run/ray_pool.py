"""Run shards on a pool of Ray actors, each loading captioner, filter and decoder once.

Resources are declared per actor from ``cfg.run`` (``num_cpus_per_actor``, ``num_gpus_per_actor``; a
fractional GPU such as 0.5 puts two actors on one GPU: Ray does not enforce memory, so size batches so
two fit). Shards are handed out as actors free up (``ray.wait``).

Fault tolerance, set on purpose (Ray's defaults are 0 and 0):
- ``max_restarts=-1``: an actor whose process dies (OOM, segfault, preemption, SIGKILL) is restarted,
  reloading its models, so the pool keeps its size.
- ``max_task_retries=0``: Ray does not silently re-run the shard that was in flight. The driver sees the
  failure, counts the attempt, and resubmits the shard to another free actor when there is one, up to
  ``cfg.run.max_shard_retries`` times; a shard that still fails is reported in the summary, and the
  run goes on. Re-running a shard is safe: outputs are written atomically, the done marker last, and
  the captions depend only on (seed, key, index), so a retry writes the same bytes.
"""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Callable
from typing import Any

import ray

from capfilt.config import Config
from capfilt.data.sample import ShardStats
from capfilt.run.worker import ShardWorker


class ShardActor:
    """A Ray actor around one ShardWorker."""

    def __init__(self, cfg: Config, captioner: str, filter_: str, provenance: dict[str, Any]):
        self.worker = ShardWorker(cfg, captioner, filter_, provenance)

    @ray.method(max_task_retries=-1)
    def pid(self) -> int:
        """Readiness probe: retried by Ray until the (restarted) actor answers, so the pool can wait for it."""
        return os.getpid()

    def run(self, url: str, name: str, out: str) -> ShardStats:
        return self.worker.run(url, name, out)


def make_actors(cfg: Config, n: int, captioner: str, filter_: str, provenance: dict[str, Any]) -> list:
    actor_cls = ray.remote(ShardActor).options(
        num_cpus=cfg.run.num_cpus_per_actor,
        num_gpus=cfg.run.num_gpus_per_actor,
        max_restarts=-1,
        max_task_retries=0,
    )
    return [actor_cls.remote(cfg, captioner, filter_, provenance) for _ in range(n)]


def run_ray(
    cfg: Config,
    jobs: list[tuple[str, str]],
    out: str,
    captioner: str,
    filter_: str,
    provenance: dict[str, Any],
    on_done: Callable[[str, ShardStats], None],
    on_failed: Callable[[str, str], None],
) -> None:
    """Feed ``jobs`` (url, name) to a pool of actors; report each shard through on_done or on_failed.

    After a failed shard its actor gets a readiness probe instead of work: a restarting actor rejects
    new tasks at once, which would burn the shard's retries. An actor whose probe fails is gone for good
    (it could not even be constructed) and leaves the pool; with no actor left, what is queued fails.
    """
    if not jobs:
        return
    actors = make_actors(cfg, min(cfg.run.actors, len(jobs)), captioner, filter_, provenance)
    queue = deque((url, name, 0, None) for url, name in jobs)  # (url, name, failures so far, last actor)
    free = list(actors)
    alive = list(actors)
    running: dict = {}  # ObjectRef → (actor, job) for shards, (actor, None) for probes
    try:
        while queue or running:
            while queue and free:
                url, name, failures, last = queue.popleft()
                actor = next((a for a in free if a is not last), free[0])  # another actor when possible
                free.remove(actor)
                running[actor.run.remote(url, name, out)] = (actor, (url, name, failures))
            if not running:  # work left but no actor alive
                url, name, _, _ = queue.popleft()
                on_failed(url, "no live actor left in the pool")
                continue
            [ref], _ = ray.wait(list(running), num_returns=1)
            actor, job = running.pop(ref)
            try:
                result = ray.get(ref)
            except ray.exceptions.RayError as err:
                if job is None:  # the probe failed: this actor is not coming back
                    alive.remove(actor)
                    continue
                url, name, failures = job
                if failures < cfg.run.max_shard_retries:
                    queue.append((url, name, failures + 1, actor))
                else:
                    on_failed(url, str(err))
                running[actor.pid.remote()] = (actor, None)
                continue
            free.append(actor)
            if job is not None:
                on_done(job[0], result)
    finally:
        for actor in actors:
            ray.kill(actor)
