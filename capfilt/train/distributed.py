"""Run a training job in this process, or data-parallel on N Ray Train workers.

Every worker runs the same ``loop.train`` with its rank: DDP averages the gradients, the MED's queues
all-gather the global batch, rank 0 writes the checkpoints into ``job.out`` (a local path here; on a
multi-node cluster it must be storage every node sees). Backend gloo on CPU, nccl on GPU.
"""

from __future__ import annotations

import dataclasses

import torch

from capfilt.train.loop import Job, train


def _worker(config: dict) -> None:
    import ray.train

    ctx = ray.train.get_context()
    train(Job(**config), rank=ctx.get_world_rank(), world=ctx.get_world_size())


def run_job(job: Job, workers: int = 1) -> None:
    """Train ``job`` to its last step, resuming from its newest checkpoint."""
    if workers <= 1:
        train(job)
        return
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    gpu = torch.cuda.is_available()
    trainer = TorchTrainer(
        _worker,
        train_loop_config=dataclasses.asdict(job),
        scaling_config=ScalingConfig(num_workers=workers, use_gpu=gpu),
        torch_config=TorchConfig(backend="nccl" if gpu else "gloo"),
        run_config=RunConfig(name=job.name, storage_path=f"{job.out}/ray"),
    )
    trainer.fit()
