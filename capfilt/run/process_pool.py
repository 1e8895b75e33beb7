"""Run shards on worker processes of this machine, without Ray (``capfilt run --processes``).

A local Ray costs a round 6-8 s of a 2-core machine before and after its work, its own processes
starting and stopping (docs/BENCHMARKS.md, "The local Ray's start and stop, taken apart"). A round on one
machine needs nothing Ray adds (nodes, an autoscaler), so this pool spawns ``run.actors`` plain processes,
each loading the models once, and talks to each over a pipe. It keeps the Ray pool's contract:
- each process gets ``run.num_cpus_per_actor`` threads and its share of this machine's GPUs
  (``CUDA_VISIBLE_DEVICES``, as Ray sets it: none when ``run.num_gpus_per_actor`` is 0);
- it takes ``run.shards_in_flight`` shards at once (threads, as in a Ray actor);
- a process that dies mid-shard (OOM, segfault, SIGKILL) is started again and reloads its models; each
  shard it held counts a failed attempt and is queued again (``dispatch.ShardQueue``);
- a process whose models cannot be built leaves the pool, and with none left each shard fails with that
  reason, as with Ray's actors.
The processes exit with the pool, or as soon as the driver is gone (their pipe closes).
"""

from __future__ import annotations

import math
import multiprocessing
import os
import signal
import threading
import time
import traceback
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from multiprocessing.connection import Connection, wait
from typing import Any

from capfilt.config import Config, RunConfig
from capfilt.data.sample import ShardStats
from capfilt.errors import UserError, last_line
from capfilt.run.dispatch import Job, RoundOutput, ShardQueue, actors_that_fit, slots
from capfilt.run.lease import LeaseLost

BUILT = "built"  # a process's first message: its models loaded (True, seconds) or not (False, failure)


def failure(err: Exception) -> tuple[str, UserError | None]:
    """What a process sends for an exception: its traceback, and the exception itself if it is the user's
    (raised again as such in the driver, so the CLI prints its one line)."""
    return traceback.format_exc(), err if isinstance(err, UserError) else None


def worker_env(run: RunConfig, index: int, visible: str | None) -> dict[str, str]:
    """Threads and GPUs of process ``index``: ``num_cpus_per_actor`` threads (at least one), and GPUs
    handed out in order from ``visible`` (the driver's ``CUDA_VISIBLE_DEVICES``; None: all), so that with
    ``num_gpus_per_actor: 0.5`` processes 0 and 1 share the first GPU, 2 and 3 the second."""
    threads = str(max(1, int(run.num_cpus_per_actor)))
    env = {"OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}
    gpus = run.num_gpus_per_actor
    if gpus <= 0:
        return env | {"CUDA_VISIBLE_DEVICES": ""}
    if gpus <= 1:
        mine = [index // int(1 / gpus + 1e-9)]  # 1/gpus processes to a GPU
    else:
        mine = list(range(index * math.ceil(gpus), (index + 1) * math.ceil(gpus)))
    ids = visible.split(",") if visible else [str(i) for i in range(max(mine) + 1)]
    if max(mine) >= len(ids):
        raise UserError(
            f"{index + 1} worker processes of run.num_gpus_per_actor={gpus} need more GPUs than "
            f"CUDA_VISIBLE_DEVICES={visible} lists: lower run.actors"
        )
    return env | {"CUDA_VISIBLE_DEVICES": ",".join(ids[i] for i in mine)}


def serve(
    conn: Connection, cfg: Config, captioner: str, filter_: str, env: dict[str, str], spawned: float
) -> None:
    """A worker process: load the models, then answer (job id, method, args) requests until the pool
    says stop (None) or the driver is gone. ``spawned``: the driver's clock when it started the process."""
    os.environ.update(env)  # before torch is imported
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C stops the driver, and so this (its pipe closes)
    try:
        import torch

        torch.set_num_threads(int(env["OMP_NUM_THREADS"]))
        from capfilt.run.worker import ShardWorker

        if cfg.run.num_gpus_per_actor > 0 and not torch.cuda.is_available():
            raise UserError(
                f"run.num_gpus_per_actor={cfg.run.num_gpus_per_actor} but this process sees no GPU "
                f"(CUDA_VISIBLE_DEVICES={env['CUDA_VISIBLE_DEVICES']})"
            )
        worker = ShardWorker(cfg, captioner, filter_)
    except Exception as err:
        conn.send((BUILT, False, failure(err)))
        return
    conn.send((BUILT, True, time.time() - spawned))  # the interpreter's start included
    sending = threading.Lock()

    def answer(job_id: int, method: str, args: tuple) -> None:
        try:
            reply = (job_id, True, getattr(worker, method)(*args))
        except Exception as err:
            reply = (job_id, False, failure(err))
        with sending:
            try:
                conn.send(reply)
            except Exception as err:  # a result that cannot be pickled fails its job, not the pool
                conn.send((job_id, False, failure(err)))

    with ThreadPoolExecutor(cfg.run.shards_in_flight) as threads:
        while True:
            try:
                request = conn.recv()
            except (EOFError, OSError):  # the driver died: so does its work, as Ray's actors do
                os._exit(1)
            if request is None:
                break
            threads.submit(answer, *request)
    os._exit(0)  # every answer is sent and every output committed: skip tearing the interpreter down


class WorkerProcess:
    """One spawned worker process and the driver's end of its pipe."""

    def __init__(self, cfg: Config, captioner: str, filter_: str, index: int):
        ctx = multiprocessing.get_context("spawn")  # never fork a process that may hold threads
        self.conn, child = ctx.Pipe()
        env = worker_env(cfg.run, index, os.environ.get("CUDA_VISIBLE_DEVICES"))
        self.process = ctx.Process(
            target=serve,
            args=(child, cfg, captioner, filter_, env, time.time()),
            name=f"capfilt-worker-{index}",
            daemon=True,
        )
        self.process.start()
        child.close()
        self.index = index
        self.build_seconds: float | None = None

    def receive(self) -> Any:
        """The next message, or None if the process is gone."""
        try:
            return self.conn.recv()
        except (EOFError, OSError):
            self.process.join(timeout=5)
            return None

    def died(self) -> str:
        return f"worker process {self.process.pid} died (exit code {self.process.exitcode})"

    def ask_to_stop(self) -> None:
        try:
            self.conn.send(None)
        except OSError:  # already gone
            pass

    def stop(self) -> None:
        """Wait for the process to exit: at once when idle; one still cleaning a shard (the driver was
        interrupted) is killed, as Ray kills its actors, and the next run cleans its shard again."""
        self.process.join(timeout=2)
        if self.process.is_alive():
            self.process.kill()
            self.process.join()
        self.conn.close()


class ProcessPool:
    """Processes started on first need: for calibration, before the threshold is known, so that they load
    their models while the round starts; else when the shards are known, as many as there are."""

    def __init__(self, cfg: Config, captioner: str, filter_: str, n_shards: int):
        self.cfg, self.captioner, self.filter, self.n_shards = cfg, captioner, filter_, n_shards
        self.workers: list[WorkerProcess] = []
        self.next_job = 0

    def size(self, n_jobs: int) -> int:
        """``run.actors``, or for "auto" as many as this machine's CPUs hold; never more than the shards."""
        run = self.cfg.run
        if run.actors != "auto":
            return max(1, min(run.actors, n_jobs))
        if run.num_gpus_per_actor > 0:
            raise UserError("run.actors: auto with --processes counts CPUs only: set run.actors with GPUs")
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        return max(1, min(actors_that_fit(run, {"CPU": cpus}), n_jobs))

    def _ensure(self, n_jobs: int) -> list[WorkerProcess]:
        if not self.workers:
            self.workers = [self._start(i) for i in range(self.size(n_jobs))]
        return self.workers

    def _start(self, index: int) -> WorkerProcess:
        return WorkerProcess(self.cfg, self.captioner, self.filter, index)

    def _send(self, worker: WorkerProcess, method: str, *args: Any) -> int:
        self.next_job += 1
        try:
            worker.conn.send((self.next_job, method, args))
        except OSError:  # it died while idle: its pipe reads as closed next, and the job is queued again
            pass
        return self.next_job

    def startup(self) -> dict[str, Any]:
        """Each live process's build (its imports and model loading, the latest if it was restarted)."""
        return {"workers": [round(w.build_seconds, 3) for w in self.workers if w.build_seconds is not None]}

    def calibration(self, human: list[str]) -> dict[str, Any]:
        """The calibration scores, from the first process (the round's device and dtype, its filter loaded)."""
        worker = self._ensure(self.n_shards)[0]
        job = self._send(worker, "calibration", human)
        while (message := worker.receive()) is not None:
            kind, ok, payload = message
            if not ok:
                error, raised = payload
                raise raised or RuntimeError(f"calibrating on a worker process failed:\n{error}")
            if kind == job:
                return payload
            worker.build_seconds = payload
        raise RuntimeError(f"calibrating: {worker.died()}")

    def close(self) -> None:
        for worker in self.workers:  # all at once, then wait for each
            worker.ask_to_stop()
        for worker in self.workers:
            worker.stop()
        self.workers = []

    def run(
        self,
        jobs: list[tuple[str, str]],
        output: RoundOutput,
        on_done: Callable[[str, ShardStats], None],
        on_failed: Callable[[str, str], None],
        stop: Callable[[], bool] = lambda: False,
    ) -> None:
        """Feed ``jobs`` (url, name) to the processes; report each shard through on_done or on_failed. Once
        ``stop()``, no new shard is started; those running are waited for."""
        if not jobs:
            return
        in_flight = self.cfg.run.shards_in_flight
        queue = ShardQueue(jobs, self.cfg.run.max_shard_retries, on_failed)
        free = slots(self._ensure(len(jobs)), in_flight)
        running: dict[int, tuple[WorkerProcess, Job]] = {}  # job id → (process, job)
        lost = ""  # why the last process to leave the pool could not be built
        while queue or running:
            if stop():
                queue.clear()  # left to the job that took the lease over
                if not running:
                    break
            while queue and free:
                worker, job = queue.take(free)
                running[self._send(worker, "run", job[0], job[1], output)] = (worker, job)
            if not running:
                queue.fail_all(f"no worker process left in the pool; the last one failed with {lost}")
                continue
            busy = {w.conn: w for w, _ in running.values()}
            for conn in wait(list(busy)):
                worker = busy[conn]
                message = worker.receive()
                if message is None or message[0] == BUILT and not message[1]:
                    error = worker.died() if message is None else message[2][0]
                    held = [job_id for job_id, (w, _) in running.items() if w is worker]
                    for job_id in held:  # the process is gone with every shard it held
                        queue.failed(running.pop(job_id)[1], worker, error)
                    free = [w for w in free if w is not worker]
                    index = self.workers.index(worker)
                    if message is None:  # died: started again, its models loaded anew
                        self.workers[index] = self._start(worker.index)
                        free += slots([self.workers[index]], in_flight)
                    else:  # cannot be built: it would fail the same way again
                        lost = last_line(error)
                        del self.workers[index]
                    continue
                kind, ok, payload = message
                if kind == BUILT:
                    worker.build_seconds = payload
                    continue
                _, job = running.pop(kind)
                free.append(worker)
                if ok:
                    on_done(job[0], payload)
                elif isinstance(payload[1], LeaseLost):  # another job's folder now: stop, no retry
                    raise payload[1]
                else:
                    queue.failed(job, worker, payload[0])
