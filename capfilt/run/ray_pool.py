"""Run shards on a pool of Ray actors, each loading captioner, filter and decoder once.

Resources are declared per actor from ``cfg.run`` (``num_cpus_per_actor``, ``num_gpus_per_actor``; a
fractional GPU such as 0.5 puts two actors on one GPU: Ray does not enforce memory, so size batches so
two fit). Shards are handed out as actors free up (``ray.wait``); an actor takes
``run.shards_in_flight`` shards at once (a threaded actor: see ``capfilt.run.worker``). A round that
calibrates its threshold builds the actors first and has the first one score the human pairs, so the
models load while the round starts and the driver needs no torch.

Pool size: ``run.actors: N`` places N actors (fewer when there are fewer shards). ``run.actors: auto``
places as many as the cluster's total resources hold for the declared per-actor resources, and looks
again every few seconds while shards are queued, so nodes that join during the run (an autoscaling
cluster, a spot node coming back) get actors too. An actor whose node is lost is restarted wherever
there is room; the pool never waits on it to finish the run.

Fault tolerance, set on purpose (Ray's defaults are 0 and 0):
- ``max_restarts=-1``: an actor whose process dies (OOM, segfault, preemption, SIGKILL) is restarted,
  reloading its models, so the pool keeps its size.
- ``max_task_retries=0``: Ray does not silently re-run the shard that was in flight. The driver sees the
  failure, counts the attempt, and resubmits the shard to another free actor when there is one, up to
  ``cfg.run.max_shard_retries`` times (``capfilt.run.dispatch.ShardQueue``); a shard that still fails is
  reported in the summary, and the run goes on.

Warm actors (``run.keep_actors``, on a running cluster only): the actors are named, detached from the job,
and left running when it ends, so the next run with the same config, the same model weights and the same
capfilt code finds them with their models loaded instead of building new ones (a scheduled job's start-up
then has no imports or model loading). They hold their CPUs and GPUs until ``capfilt actors --stop``.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from collections.abc import Callable
from importlib import metadata
from pathlib import Path
from typing import Any

import ray

import capfilt
from capfilt.config import Config, RunConfig
from capfilt.data.sample import ShardStats
from capfilt.errors import UserError, last_line
from capfilt.run.dispatch import RoundOutput, ShardQueue, actors_that_fit, slots
from capfilt.run.lease import LeaseLost
from capfilt.signals import exit_on_sigterm


class ShardActor:
    """A Ray actor around one ShardWorker."""

    def __init__(self, cfg: Config, captioner: str, filter_: str):
        start = time.perf_counter()
        from capfilt.run.worker import ShardWorker  # torch and the models: the actor's, not the driver's

        self.worker = ShardWorker(cfg, captioner, filter_)
        self.seconds_to_build = time.perf_counter() - start  # imports and model loading: a fixed cost

    def build_seconds(self) -> float:
        return self.seconds_to_build

    @ray.method(max_task_retries=-1)
    def pid(self) -> int:
        """Readiness probe: retried by Ray until the (restarted) actor answers, so the pool can wait for it."""
        return os.getpid()

    def calibration(self, human: list[str]) -> dict[str, Any]:
        return self.worker.calibration(human)

    def run(self, url: str, name: str, output: RoundOutput) -> ShardStats:
        return self.worker.run(url, name, output)


def connect_ray(address: str | None) -> bool:
    """Join ``address`` ("auto" under ``ray job submit``) or start a local Ray; True if we started it."""
    if ray.is_initialized():
        return False
    if address is None:
        ray.init(include_dashboard=False)
    else:
        try:
            ray.init(address=address)
        except ConnectionError as err:
            raise UserError(
                f"no Ray cluster at --address {address} ({last_line(str(err))}); start one (`ray start "
                "--head`), or leave --address out to start a local Ray, or run with --processes"
            ) from None
    exit_on_sigterm()  # ray.init's own handler exits 15; a stopped round's status stays 143
    return True


GROW_CHECK_S = 2.0  # how often an "auto" pool looks for new cluster capacity while shards are queued


def pool_size(run: RunConfig, n_jobs: int) -> int:
    """Actors wanted now: the fixed number, or what the cluster holds (at least one, so that an
    autoscaler sees demand), never more than there are shards."""
    n = actors_that_fit(run, ray.cluster_resources()) if run.actors == "auto" else run.actors
    return max(1, min(n, n_jobs))


NAMESPACE = "capfilt"  # the warm actors' Ray namespace


def make_actors(cfg: Config, n: int, captioner: str, filter_: str, warm: str | None = None, first: int = 0):
    """``n`` actors; with ``warm`` (a :func:`warm_prefix`), named ``WARM-i`` from ``i = first`` and detached:
    those the cluster already runs are taken as they are. Returns the actors and those of them built now."""
    options = {
        "num_cpus": cfg.run.num_cpus_per_actor,
        "num_gpus": cfg.run.num_gpus_per_actor,
        "max_restarts": -1,
        "max_task_retries": 0,
        "max_concurrency": cfg.run.shards_in_flight,  # threads; each shard (or probe) holds one
    }

    def build(**named):
        return ray.remote(ShardActor).options(**options, **named).remote(cfg, captioner, filter_)

    if warm is None:
        actors = [build() for _ in range(n)]
        return actors, actors
    actors, built = [], []
    for name in (f"{warm}-{i}" for i in range(first, first + n)):
        try:
            actors.append(ray.get_actor(name, namespace=NAMESPACE))
        except ValueError:  # none yet (get_if_exists: another job may be creating it this instant)
            named = {"name": name, "namespace": NAMESPACE, "lifetime": "detached", "get_if_exists": True}
            built.append(build(**named))
            actors.append(built[-1])
    return actors, built


def warm_prefix(cfg: Config, hashes: dict[str, str]) -> str:
    """The name of the warm actors that serve exactly this config, these model weights (``hashes``), this
    capfilt code and these torch and transformers versions (from their metadata: the driver imports
    neither): a change to any of them gets new actors, never ones that would clean otherwise."""
    code = hashlib.sha256()
    for path in sorted(Path(capfilt.__file__).parent.rglob("*.py")):
        code.update(path.read_bytes())
    versions = {name: metadata.version(name) for name in ("torch", "transformers")}
    key = {"config": cfg.to_dict(), "models": hashes, "code": code.hexdigest(), "versions": versions}
    return "capfilt-" + hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


def warm_names() -> list[str]:
    """The warm actors the connected cluster runs, whatever they serve."""
    named = ray.util.list_named_actors(all_namespaces=True)
    return sorted(a["name"] for a in named if a["namespace"] == NAMESPACE)


def warm_actors(address: str, stop: bool = False) -> list[str]:
    """The names of the warm actors the cluster at ``address`` runs; ``stop`` kills them (their CPUs and
    GPUs go back to the cluster)."""
    connect_ray(address)
    names = warm_names()
    if stop:
        for name in names:
            ray.kill(ray.get_actor(name, namespace=NAMESPACE))
    return names


class RayPool:
    """Actors built on first need: for calibration, before the threshold is known, so that they load
    their models while the round starts; else when the shards are known, as many as there are."""

    def __init__(
        self,
        cfg: Config,
        captioner: str,
        filter_: str,
        n_shards: int,
        address: str | None = None,
        warm: str | None = None,
    ):
        self.cfg, self.captioner, self.filter, self.n_shards = cfg, captioner, filter_, n_shards
        self.address, self.started_ray, self.warm = address, False, warm
        self.actors: list = []
        self.built: list = []  # the actors built by this run (the others are warm ones an earlier run built)
        self.ray_seconds = 0.0

    def _more(self, n: int) -> list:
        new, built = make_actors(self.cfg, n, self.captioner, self.filter, self.warm, first=len(self.actors))
        self.actors += new
        self.built += built
        return new

    def _ensure(self, n_jobs: int) -> list:
        if not self.actors:
            start = time.perf_counter()
            self.started_ray = connect_ray(self.address)
            self.ray_seconds = time.perf_counter() - start
            others = [n for n in warm_names() if not (self.warm and n.startswith(self.warm + "-"))]
            if others:  # else a round that finds no room for its actors waits without a word
                print(
                    f"[capfilt] {len(others)} warm actor(s) of other runs ({others[0].rsplit('-', 1)[0]}-* ...) hold "
                    "their CPUs and GPUs in this cluster; `capfilt actors --stop` frees them",
                    file=sys.stderr,
                    flush=True,
                )
            self._more(pool_size(self.cfg.run, n_jobs))
        return self.actors

    def startup(self) -> dict[str, Any]:
        """Where the pool's start went: starting (or joining) Ray, and each live actor's build (imports and
        model loading, its latest if it was restarted; a warm actor's was an earlier run's). An actor that
        does not answer in a few seconds is left out rather than waited for."""
        refs = [actor.build_seconds.remote() for actor in self.built]
        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=5.0) if refs else ([], [])
        workers = []
        for ref in ready:
            try:
                workers.append(round(ray.get(ref), 3))
            except ray.exceptions.RayError:
                continue
        warm = {"warm": len(self.actors) - len(self.built)} if self.warm else {}
        return {"ray": round(self.ray_seconds, 3), "workers": workers} | warm

    def calibration(self, human: list[str]) -> dict[str, Any]:
        """The calibration scores, from the first actor (on the round's device, its filter loaded)."""
        return ray.get(self._ensure(self.n_shards)[0].calibration.remote(human))

    def close(self) -> None:
        """Kill the actors (or leave warm ones running), and stop Ray if this pool started it."""
        if self.warm and self.actors:
            print(
                f"[capfilt] {len(self.actors)} warm actor(s) {self.warm}-* left running with their models, "
                "for the next run with the same models and config; `capfilt actors --stop` frees them",
                file=sys.stderr,
                flush=True,
            )
        for actor in [] if self.warm else self.actors:
            ray.kill(actor)
        if self.started_ray:
            ray.shutdown()

    def run(
        self,
        jobs: list[tuple[str, str]],
        output: RoundOutput,
        on_done: Callable[[str, ShardStats], None],
        on_failed: Callable[[str, str], None],
        stop: Callable[[], bool] = lambda: False,
    ) -> None:
        """Feed ``jobs`` (url, name) to the actors; report each shard through on_done or on_failed. Once
        ``stop()``, no new shard is started; those running are waited for.

        After a failed shard its actor gets a readiness probe instead of work: a restarting actor rejects
        new tasks at once, which would burn the shard's retries. An actor whose probe fails is gone for
        good (it could not even be constructed) and leaves the pool; with no actor left, what is queued
        fails.
        """
        if not jobs:
            return
        cfg = self.cfg
        auto = cfg.run.actors == "auto"
        actors = self._ensure(len(jobs))
        queue = ShardQueue(jobs, cfg.run.max_shard_retries, on_failed)
        free = slots(actors, cfg.run.shards_in_flight)
        alive = list(actors)
        lost = ""  # why the last actor to leave the pool died: what the shards left over fail with
        running: dict = {}  # ObjectRef → (actor, job) for shards, (actor, None) for probes
        next_check = time.monotonic() + GROW_CHECK_S
        while queue or any(job is not None for _, job in running.values()):
            if auto and queue and time.monotonic() >= next_check:
                next_check = time.monotonic() + GROW_CHECK_S
                new = self._more(pool_size(cfg.run, len(jobs)) - len(alive))
                free += slots(new, cfg.run.shards_in_flight)
                alive += new
            if stop():
                queue.clear()  # left to the job that took the lease over
                if not running:
                    break
            while queue and free:
                actor, job = queue.take(free)
                running[actor.run.remote(job[0], job[1], output)] = (actor, job)
            if not running:  # work left but no actor alive
                queue.fail_all(f"no live actor left in the pool; the last one died of {lost}")
                continue
            ready, _ = ray.wait(list(running), num_returns=1, timeout=GROW_CHECK_S if auto else None)
            if not ready:
                continue
            actor, job = running.pop(ready[0])
            try:
                result = ray.get(ready[0])
            except ray.exceptions.RayError as err:
                if job is None:  # the probe failed: this actor is not coming back
                    lost = last_line(str(err))
                    alive = [a for a in alive if a is not actor]  # (each of its slots sent a probe)
                    free = [a for a in free if a is not actor]
                    continue
                if isinstance(getattr(err, "cause", None), LeaseLost):  # another job's folder now: stop
                    raise err.cause from None
                queue.failed(job, actor, str(err))
                running[actor.pid.remote()] = (actor, None)
                continue
            free.append(actor)
            if job is not None:
                on_done(job[0], result)
