"""`capfilt bench` / `make bench`: the throughput figures docs/BENCHMARKS.md records, measured on demand.

Three measurements, each a function elsewhere that a test or a person can call alone: decode throughput
(Pillow and DALI in CPU mode), training throughput (a short pretrain at the config's size), and a CapFilt
round against the batched HF script and the one-image loop (the demo's round-0 models by default, or
random ones at the config's size). ``--device`` runs :func:`bench_device` instead: the GPU path's table.
"""

from __future__ import annotations

import copy
import dataclasses
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


def web_captions(world: Path, n: int = 500) -> list[str]:
    """Some of the world's web captions: what a random model's tokenizer is trained on."""
    from capfilt.data.reader import iter_shard
    from capfilt.data.sample import Sample
    from capfilt.data.specs import expand_shards

    url = expand_shards([str(world / "web-*.tar")])[0]
    return [s.caption for s in iter_shard(url) if isinstance(s, Sample)][:n] + ["a picture of"]


def run_bench(
    cfg: Config, world: Path, models: Path | None, parts: list[str], random_models: bool = False
) -> dict:
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
        from capfilt.run import bench

        with tempfile.TemporaryDirectory(prefix="capfilt-models-") as tmp:
            if random_models:
                model_cfg = dataclasses.replace(cfg.model, image_size=cfg.run.image_size)
                paths = bench.random_models(model_cfg, tmp, web_captions(world))
                result["models"] = f"random weights at the {cfg.name} config's size"
            elif models is not None and (models / "captioner").is_dir():
                paths = (str(models / "captioner"), str(models / "filter"))
                result["models"] = str(models)
            else:
                raise SystemExit(
                    "the round benchmark needs --models DIR holding captioner/ and filter/ "
                    "(e.g. runs/demo/round-0/finetune after `make demo`), or --random-models"
                )
            truth = world / "truth.parquet"
            # The same fixed threshold as the HF script: calibrating first would time the human split too.
            fixed = dataclasses.replace(cfg, filter=dataclasses.replace(cfg.filter, calibration="none"))
            result["round"] = bench.bench_round(
                fixed, web, *paths, truth=str(truth) if truth.exists() else None
            )
    return result


def bench_device(
    cfg: Config,
    world: Path,
    device: str,
    batch_sizes: list[int],
    images: int,
    actors: list[int],
) -> tuple[dict, str]:
    """The GPU path, measured on ``device`` (it runs on the CPU too, at a small size): decode at the run's
    image size (Pillow, and DALI ``mixed`` on CUDA or DALI CPU), the captioner and the filter at the
    config's model size with random weights (bf16 on CUDA) over a batch-size sweep, and the end-to-end
    round with 1..n actors sharing the device. Returns the figures and a markdown table."""
    from capfilt.data.bench_decode import bench_decode
    from capfilt.data.decode import PillowDecoder
    from capfilt.data.reader import ShardReader
    from capfilt.data.specs import expand_shards
    from capfilt.run import bench
    from capfilt.run.pipeline import decoded_batches
    from capfilt.run.round import run_round
    from capfilt.stages.captioner import Captioner
    from capfilt.stages.filter import Filter

    world, cuda = Path(world), device == "cuda"
    web = [str(world / "web-*.tar")]
    dtype = torch.bfloat16 if cuda else torch.float32
    rows: list[tuple[str, str, float]] = []
    size = cfg.run.image_size
    for name in ("pillow", "dali"):
        r = bench_decode(web, name, size, cfg.run.decode_threads, cfg.run.batch_size, images, 1, gpu=cuda)
        label = {"pillow": "Pillow", "dali": "DALI mixed" if cuda else "DALI CPU"}[name]
        rows.append(("decode", f"{label}, {size} px, {r['threads']} thread(s)", r["images_per_s"]))
    with tempfile.TemporaryDirectory(prefix="capfilt-models-") as tmp:
        model_cfg = dataclasses.replace(cfg.model, image_size=size)
        cap_path, flt_path = bench.random_models(model_cfg, tmp, web_captions(world))
        cap, flt = (
            Captioner(cap_path, cfg.caption, device, cfg.run.seed),
            Filter(flt_path, cfg.filter, device),
        )
        cap.model.to(dtype)
        flt.model.to(dtype)
        decoder = PillowDecoder(size, 1, cfg.run.max_pixels)
        samples = [
            b for b in decoded_batches(ShardReader(expand_shards(web)[0]), decoder, images) if b.samples
        ]
        pixels, keys = samples[0].pixels.to(device, dtype), [s.key for s in samples[0].samples]
        web_text = [s.caption for s in samples[0].samples]
        for bs in batch_sizes:
            batches = [
                (pixels[i : i + bs], keys[i : i + bs], web_text[i : i + bs]) for i in range(0, len(keys), bs)
            ]
            ips = bench.model_images_per_s({"capfilt": (cap, flt)}, batches)["capfilt"]
            rows.append(
                ("model", f"captioner + filter, batch {bs}, {str(dtype).removeprefix('torch.')}", ips)
            )
        del cap, flt
        for n in actors:
            run = copy.deepcopy(cfg)
            run.run.actors = n
            run.run.num_gpus_per_actor = 1 / n if cuda else 0.0
            summary = run_round(run, web, f"{tmp}/round-{n}", cap_path, flt_path, progress=False)
            rows.append(
                (
                    "round",
                    f"end to end, {n} actor(s) on one {device}, float32 models",
                    summary["this_invocation"]["images_per_s"],
                )
            )
    table = "\n".join(
        ["| part | what | images/s |", "| --- | --- | --- |"]
        + [f"| {p} | {w} | {v:,.1f} |" for p, w, v in rows]
    )
    return {"machine": machine(), "config": cfg.name, "device": device, "rows": rows}, table
