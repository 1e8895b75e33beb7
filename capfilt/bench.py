"""`capfilt bench` / `make bench`: the throughput figures docs/BENCHMARKS.md records, measured on demand.

Three measurements, each a function elsewhere that a test or a person can call alone: decode throughput
(Pillow and DALI in CPU mode, plus DALI mixed where a GPU is present), training throughput (a short
pretrain at the config's size), and a CapFilt round against a naive one-image loop (needs a captioner
and a filter: the demo's round-0 models by default).
"""

from __future__ import annotations

import copy
import json
import platform
import tempfile
from datetime import date
from pathlib import Path

import torch

from capfilt.config import Config
from capfilt.train.checkpoint import latest_checkpoint


def machine() -> dict:
    return {
        "date": date.today().isoformat(),
        "cpus": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
    }


def bench_train(cfg: Config, shards: list[str], steps: int = 30) -> dict:
    """Pretraining samples/s over ``steps`` optimiser steps (ITC + ITM + LM, the config's batch size)."""
    from capfilt.train.pretrain import pretrain

    cfg = copy.deepcopy(cfg)
    cfg.pretrain.steps, cfg.pretrain.checkpoint_every = steps, steps
    with tempfile.TemporaryDirectory(prefix="capfilt-bench-") as out:
        pretrain(cfg, shards, Path(out))
        state = json.loads((latest_checkpoint(out) / "state.json").read_text())
    return {
        "steps": steps,
        "batch_size": cfg.pretrain.batch_size,
        "samples_per_s": round(state["samples_per_s"], 1),
    }


def run_bench(cfg: Config, world: Path, models: Path | None, parts: list[str]) -> dict:
    """The requested parts ("decode", "train", "round") on a demo world folder."""
    from capfilt.data.bench_decode import bench_decode

    world = Path(world)
    web = [str(world / "web-*.tar")]
    result: dict = {"machine": machine(), "config": cfg.name}
    if "decode" in parts:
        decoders = ["pillow", "dali"]
        result["decode"] = [bench_decode(web, d, image_size=cfg.run.image_size) for d in decoders]
    if "train" in parts:
        result["train"] = bench_train(cfg, [*web, str(world / "human-*.tar")])
    if "round" in parts:
        from capfilt.run.bench import bench_round

        if models is None or not (models / "captioner").is_dir():
            raise SystemExit(
                "the round benchmark needs --models DIR holding captioner/ and filter/ "
                "(e.g. runs/demo/round-0/finetune after `make demo`)"
            )
        result["round"] = bench_round(
            cfg, web, str(models / "captioner"), str(models / "filter"), truth=str(world / "truth.parquet")
        )
    return result
