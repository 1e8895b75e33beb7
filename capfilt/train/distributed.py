"""Run a training job in this process, or data-parallel on N Ray Train workers.

Every worker runs the same ``loop.train`` with its rank: DDP averages the gradients, the MED's queues
all-gather the global batch, rank 0 writes the checkpoints into ``job.out`` (a local path here; on a
multi-node cluster it must be storage every node sees). Backend gloo on CPU, nccl on GPU.

A worker that dies (its node lost) fails the whole group; Ray Train then starts a new group of the same
size wherever the resources are, and ``loop.train`` resumes it from the newest checkpoint. The world size
never changes, so neither does the schedule nor the data order.
"""

from __future__ import annotations

import dataclasses

import torch

from capfilt.config import TrainConfig
from capfilt.data.specs import canonical
from capfilt.errors import UserError
from capfilt.train.loop import Job, check_lease, train

# Worker-group failures a job recovers from before it fails. A lost node is one; a bug fails every
# attempt the same way, so more retries only cost a group start each.
MAX_FAILURES = 3


def _worker(config: dict) -> None:
    import ray.train

    ctx = ray.train.get_context()
    train(Job(**config), rank=ctx.get_world_rank(), world=ctx.get_world_size())


def run_job(job: Job, stage: TrainConfig) -> None:
    """Train ``job`` to its last step on ``stage.workers``, resuming from its newest checkpoint."""
    workers = max(1, stage.workers)
    if job.n_pairs < stage.batch_size * workers:  # said once, not as a traceback from every rank's Schedule
        raise UserError(
            f"{job.name}: {job.n_pairs} training pairs, fewer than one global batch of "
            f"{stage.batch_size * workers} ({job.stage}.batch_size {stage.batch_size} x {workers} workers): "
            "lower the batch size or add data (the line above says what was rejected)"
        )
    if stage.workers <= 1:
        train(job)
        return
    # Ray Train refuses a relative storage path, and a rank's working folder is not the driver's
    job = dataclasses.replace(
        job, **{f: canonical(getattr(job, f)) for f in ("out", "init", "lease") if getattr(job, f)}
    )
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    gpu = torch.cuda.is_available()
    trainer = TorchTrainer(
        _worker,
        train_loop_config=dataclasses.asdict(job),
        scaling_config=ScalingConfig(
            num_workers=stage.workers, use_gpu=gpu, placement_strategy=stage.placement
        ),
        torch_config=TorchConfig(backend="nccl" if gpu else "gloo"),
        run_config=RunConfig(
            name=job.name,
            storage_path=f"{job.out}/ray",
            failure_config=FailureConfig(max_failures=MAX_FAILURES),
        ),
    )
    try:
        trainer.fit()
    except Exception:  # Ray Train wraps the ranks' LeaseLost: say it as the CLI says its own errors
        check_lease(job)
        raise
