"""What one process needs to clean shards: captioner, filter and decoders loaded once, many shards served.

The local runner holds one; each Ray actor and each worker process (``--processes``) holds one. Either
way a shard goes through the same :func:`capfilt.run.pipeline.process_shard`. The threshold and the
provenance come with each shard (a ``dispatch.RoundOutput``), not with the worker: a calibrated
threshold is scored by a worker (on the round's own device and dtype), so it is known only once the
workers are up. A worker can serve ``run.shards_in_flight`` shards at once (a Ray actor or a worker
process calls ``run`` from that many threads): each takes a decoder of its own, and a lock lets one batch
at a time through the models, which hold per-call state (the sampler's CUDA graphs).
"""

from __future__ import annotations

import dataclasses
import queue
import threading
from typing import Any

import torch

from capfilt.config import Config
from capfilt.data.decode import Planes, make_decoder
from capfilt.data.sample import ShardStats
from capfilt.errors import UserError
from capfilt.eval.heldout import load_heldout
from capfilt.run.dispatch import RoundOutput
from capfilt.run.pipeline import BatchLimit, process_shard
from capfilt.stages.calibrate import calibrate
from capfilt.stages.captioner import Captioner
from capfilt.stages.filter import Filter


def default_device() -> str:
    """The GPU Ray (or CUDA_VISIBLE_DEVICES) gave this process, else the CPU."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def same_vision(captioner: Captioner, filter_: Filter) -> bool:
    """Whether the two hold the same ViT weights (both finetuned with ``finetune.freeze_vision``), so that
    one pass per batch serves both. Beam search encodes its images inside HF ``generate``, so it never
    shares."""
    if captioner.cfg.method == "beam":
        return False
    ours, theirs = captioner.model.vision_model.state_dict(), filter_.model.vision_model.state_dict()
    return ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)


def human_pairs(human: list[str], cfg: Config) -> tuple[Planes, list[str]]:
    """The first ``filter.calibration_samples`` decodable images of the ``human`` shard URLs with their
    (first) caption, decoded as a round decodes them; one image however many samples hold it, so that a
    mismatched pair (``stages.calibrate``) never gives an image a caption of its own picture."""
    data = load_heldout(human, cfg.run, limit=cfg.filter.calibration_samples)
    if len(data.keys) < 2:
        raise UserError(
            f"calibrating the threshold needs at least 2 human pairs; {human} gave {len(data.keys)}"
        )
    return data.pixels, [refs[0] for refs in data.references]


class ShardWorker:
    def __init__(self, cfg: Config, captioner: str, filter_: str, device: str | None = None):
        device = device or default_device()
        self.cfg, self.device = cfg, torch.device(device)
        self.captioner = Captioner(captioner, cfg.caption, device, cfg.run.seed, cfg.run.dtype)
        self.filter = Filter(filter_, cfg.filter, device, cfg.run.dtype)
        for role, stage in (("captioner", self.captioner), ("filter", self.filter)):
            size = stage.model.vision_model.config.image_size
            if size != cfg.run.image_size:  # else every image would be a caption_failed reject
                raise UserError(
                    f"the {role}'s ViT takes {size}-px images (vision_config.image_size in its config.json) "
                    f"but run.image_size is {cfg.run.image_size}: set run.image_size={size}"
                )
        self.shared_vision = same_vision(self.captioner, self.filter)
        if self.shared_vision:  # one ViT in memory too
            self.filter.model.vision_model = self.captioner.model.vision_model
        self.models = threading.Lock()
        self.limit = BatchLimit()  # what fits in memory, learnt once for all the worker's shards
        self.decoders: queue.SimpleQueue = queue.SimpleQueue()
        for _ in range(cfg.run.shards_in_flight):
            self.decoders.put(make_decoder(cfg.run))

    def calibration(self, human: list[str]) -> dict[str, Any]:
        """ITM scores of the human pairs (shard URLs), matched and mismatched (stages.calibrate), by this
        worker's filter."""
        with self.models:
            return calibrate(self.filter.itm_only(), *human_pairs(human, self.cfg), self.cfg.run.seed)

    def run(self, url: str, name: str, output: RoundOutput) -> ShardStats:
        """Clean shard ``url`` into ``output.out/NAME.*``."""
        threshold = output.threshold
        cfg = dataclasses.replace(self.cfg, filter=dataclasses.replace(self.cfg.filter, threshold=threshold))
        decoder = self.decoders.get()
        try:
            return process_shard(
                url,
                output.out,
                self.captioner,
                self.filter,
                decoder,
                cfg,
                output.provenance,
                name=name,
                device=self.device,
                models=self.models,
                shared_vision=self.shared_vision,
                limit=self.limit,
                owner=output.owner,
            )
        finally:
            self.decoders.put(decoder)
