"""The one training loop, for pretraining and both finetunings, in one process or in each Ray worker.

Read it top to bottom: load the MED (from the newest checkpoint in ``job.out`` if there is one), build
AdamW, then per step: seed from (seed, step, rank), set the learning rate (linear warm-up, cosine to
min_lr) and alpha (linear ramp over ``alpha_ramp_epochs``), forward the requested losses, clip, step,
add to the loss curve (``curve.py``: bounded, whatever the steps), log, checkpoint. The data order is a
pure function of (seed, epoch), so resuming at step s means skipping ``s mod steps_per_epoch`` batches
of epoch ``s // steps_per_epoch``; the result equals an uninterrupted run's.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel

from capfilt.config import TrainConfig, config_from_dict
from capfilt.model.hf import load_med
from capfilt.model.tokenizer import prompt_length, tokenize
from capfilt.run import faults
from capfilt.run.lease import check_held
from capfilt.train.checkpoint import latest_checkpoint, load_state, save_checkpoint
from capfilt.train.curve import LossCurve
from capfilt.train.data import epoch_loader


@dataclass
class Job:
    """One training run as plain data, so that the same job runs here or in every Ray Train worker."""

    name: str  # for logs: "pretrain", "captioner", "filter"
    config: dict  # Config.to_dict()
    stage: str  # "pretrain" or "finetune": which TrainConfig of the config applies
    init: str  # MED folder to start from when ``out`` has no checkpoint yet
    shards: list[str]
    out: str  # checkpoints go to out/step-N, out/latest
    n_pairs: int  # training pairs per epoch (data.count_pairs), for the schedule
    losses: list[str]
    prompt: str = ""  # prepended to every caption and masked out of the LM loss
    use_idx: bool = False  # image ids: same-image captions are ITC positives, never ITM negatives
    log_every: int = 10
    remote: str = ""  # URL that ``out`` mirrors (a bootstrap on s3://): every checkpoint is uploaded there
    lease: str = ""  # the job's lease file and its owner: every rank stops (LeaseLost) once another job
    lease_owner: str = ""  # holds it, before writing a checkpoint beside that job's
    unordered: list[str] = field(default_factory=list)  # shards read grouped by key (data.PairCount)


@dataclass
class Schedule:
    """Steps of a run and the per-step learning rate and alpha."""

    stage: TrainConfig
    steps_per_epoch: int
    alpha: float
    total: int = field(init=False)

    def __post_init__(self):
        if self.steps_per_epoch < 1:
            raise ValueError("fewer training pairs than one global batch: lower batch_size or add data")
        self.total = self.stage.steps or self.stage.epochs * self.steps_per_epoch

    def lr(self, step: int) -> float:
        s = self.stage
        if step < s.warmup_steps:
            return s.lr * (step + 1) / s.warmup_steps
        progress = (step - s.warmup_steps) / max(1, self.total - s.warmup_steps)
        return s.min_lr + 0.5 * (s.lr - s.min_lr) * (1 + math.cos(math.pi * min(1.0, progress)))

    def alpha_at(self, step: int) -> float:
        return self.alpha * min(1.0, step / (self.stage.alpha_ramp_epochs * self.steps_per_epoch))


def make_optimizer(model: torch.nn.Module, stage: TrainConfig) -> torch.optim.AdamW:
    """AdamW; matrices decay, biases, LayerNorm weights and the temperature (ndim < 2) do not."""
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.AdamW(
        [
            {"params": [p for p in params if p.ndim >= 2], "weight_decay": stage.weight_decay},
            {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
        ],
        lr=stage.lr,
    )


def step_seed(seed: int, step: int, rank: int) -> int:
    """The torch seed of one step on one rank: dropout and ITM negatives never depend on history."""
    return (seed * 1_000_003 + step) * 1_009 + rank


def check_lease(job: Job) -> None:
    """Raise ``LeaseLost`` if another job took ``job``'s lease over (none: a job without a lease)."""
    if job.lease:
        check_held(job.lease, job.lease_owner)


def train(job: Job, rank: int = 0, world: int = 1) -> dict:
    """Run ``job`` to its last step on this rank; rank 0 writes checkpoints. Returns rank 0's state."""
    check_lease(job)  # a worker group Ray Train restarts after the lease was lost stops at once
    cfg = config_from_dict(job.config)
    stage: TrainConfig = getattr(cfg, job.stage)
    device = (
        torch.device("cuda", torch.cuda.current_device())
        if torch.cuda.is_available()
        else torch.device("cpu")
    )
    ckpt = latest_checkpoint(job.out)
    if ckpt and rank == 0:
        print(f"[{job.name}] resuming from {ckpt.name}", flush=True)
    med, tok, _ = load_med(ckpt / "med" if ckpt else job.init)
    med.resize_image(stage.image_size)
    med.text_chunk = stage.text_chunk
    if stage.freeze_vision:  # before the optimiser, which takes only what requires a gradient
        med.vision.requires_grad_(False)
    med.to(device).train()
    opt = make_optimizer(med, stage)
    state = load_state(ckpt, opt) if ckpt else {"step": 0, "history": []}
    model = (
        DistributedDataParallel(med, find_unused_parameters=True, broadcast_buffers=False)
        if world > 1
        else med
    )

    sched = Schedule(stage, job.n_pairs // (stage.batch_size * world), cfg.model.alpha)
    prompt_len = prompt_length(tok, job.prompt) if job.prompt else 0
    step, curve = state["step"], LossCurve(state["history"])
    start, t0 = step, time.perf_counter()
    while step < sched.total:
        epoch, done = divmod(step, sched.steps_per_epoch)
        batches = epoch_loader(job.shards, stage, epoch, rank, world, skip=done, unordered=job.unordered)
        wanted = min(sched.steps_per_epoch - done, sched.total - step)
        for batch in islice(batches, wanted):
            wanted -= 1
            torch.manual_seed(step_seed(stage.seed, step, rank))
            lr, alpha = sched.lr(step), sched.alpha_at(step)
            for group in opt.param_groups:
                group["lr"] = lr
            ids, mask = tokenize(tok, [job.prompt + c for c in batch["captions"]], cfg.model.max_text_len)
            idx = batch["idx"].to(device) if job.use_idx else None
            with torch.autocast("cuda", torch.bfloat16, enabled=device.type == "cuda" and stage.bf16):
                losses = model(
                    batch["pixels"].to(device),
                    ids.to(device),
                    mask.to(device),
                    alpha=alpha,
                    losses=job.losses,
                    idx=idx,
                    prompt_len=prompt_len,
                )
            opt.zero_grad(set_to_none=True)
            losses["loss"].backward()
            torch.nn.utils.clip_grad_norm_(med.parameters(), stage.grad_clip)
            opt.step()
            step += 1

            values = {"lr": lr, "alpha": alpha} | {k: v.item() for k, v in losses.items()}
            curve.add(step, values)
            samples_per_s = (step - start) * stage.batch_size * world / (time.perf_counter() - t0)
            if rank == 0 and (step % job.log_every == 0 or step == sched.total):
                parts = " ".join(f"{k} {v:.4f}" for k, v in values.items())
                print(
                    f"[{job.name}] step {step}/{sched.total} {parts} {samples_per_s:.1f} samples/s",
                    flush=True,
                )
            if step % stage.checkpoint_every == 0 or step == sched.total:
                check_lease(job)  # on every rank, so that all of them stop together
                if rank == 0:
                    state = {"history": curve.points, "samples_per_s": samples_per_s, "total": sched.total}
                    save_checkpoint(job.out, step, med, tok, opt, state, job.remote)
                    faults.maybe_kill(f"{job.name}.step-{step}")
        if wanted:
            raise RuntimeError(
                f"[{job.name}] epoch {epoch} ran out of data {wanted} batches early on rank {rank}: its "
                "images failed to decode after counting (their rejects are counted by read_pairs/decoded), "
                "or its shards hold no pair (a job trains on count_pairs' shards, which all hold one)."
            )
    return state


def final_checkpoint(out: str | Path) -> Path:
    """The checkpoint a finished job left; an error if it never wrote one."""
    ckpt = latest_checkpoint(out)
    if ckpt is None:
        raise RuntimeError(f"{out}: training wrote no checkpoint")
    return ckpt
