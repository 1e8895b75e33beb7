"""`capfilt bench` / `make bench`: the throughput figures docs/BENCHMARKS.md records, measured on demand.

Four measurements, each a function that a test or a person can call alone: decode throughput (Pillow
and DALI in CPU mode), training throughput (a short pretrain at the config's size), a CapFilt round
against the batched HF script and the one-image loop (the demo's round-0 models by default, or random
ones at the config's size), and peak memory against corpus size (opt-in: ``--parts memory``).
``--device`` runs :func:`bench_device` instead: the GPU path's table.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import gc
import json
import multiprocessing
import platform
import resource
import sys
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


def cycled_shards(world: Path, images: int, folder: Path) -> list[str]:
    """Links in ``folder`` cycling through the world's web shards until they hold ``images`` images: a
    corpus of any size from the demo world (the data repeat, but every shard is read and written)."""
    from capfilt.data.reader import iter_shard
    from capfilt.data.sample import Sample
    from capfilt.data.specs import expand_shards

    sources = expand_shards([str(world / "web-*.tar")])
    per_shard = sum(isinstance(s, Sample) for s in iter_shard(sources[0]))
    folder.mkdir(parents=True, exist_ok=True)
    links = []
    for i in range(-(-images // per_shard)):
        link = folder / f"web-{i:06d}.tar"
        link.symlink_to(Path(sources[i % len(sources)]).resolve())
        links.append(str(link))
    return links


def fixed_threshold(cfg: Config) -> Config:
    """``cfg`` with ``filter.threshold`` used as it is: calibrating would time (or hold) the human split too."""
    return dataclasses.replace(cfg, filter=dataclasses.replace(cfg.filter, calibration="none"))


def _peak_rss_child(part: str, cfg: Config, shards: list[str], models: tuple[str, str], out: str, q) -> None:
    with contextlib.redirect_stdout(sys.stderr):  # the training log must not mix into the bench's JSON
        if part == "round":
            from capfilt.run.round import run_round

            run_round(cfg, shards, out, *models, local=True, progress=False)
        else:
            from capfilt.train.pretrain import pretrain

            pretrain(cfg, shards, out)
    q.put(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)


def bench_memory(cfg: Config, world: Path, sizes: list[int]) -> list[dict]:
    """Peak RSS (MiB) of a round's worker process (``run_round(local=True)``: captioner, filter, decoder
    and read-ahead in one process, as in an actor) and of a training rank (one pretraining epoch) at each
    corpus size, each in a fresh process: whether anything grows with the corpus. Random models at the
    config's size and a fixed threshold: model memory and calibration are constants."""
    from capfilt.run import bench

    cfg = fixed_threshold(cfg)
    ctx, rows = multiprocessing.get_context("spawn"), []
    with tempfile.TemporaryDirectory(prefix="capfilt-memory-") as tmp:
        model_cfg = dataclasses.replace(cfg.model, image_size=cfg.run.image_size)
        models = bench.random_models(model_cfg, f"{tmp}/models", web_captions(Path(world)))
        for n in sizes:
            shards = cycled_shards(Path(world), n, Path(tmp) / f"corpus-{n}")
            train = copy.deepcopy(cfg)
            train.pretrain.steps = -(-n // cfg.pretrain.batch_size)  # one epoch
            train.pretrain.checkpoint_every = train.pretrain.steps
            for part, part_cfg in (("round", cfg), ("train", train)):
                q = ctx.Queue()
                args = (part, part_cfg, shards, models, f"{tmp}/{part}-{n}", q)
                child = ctx.Process(target=_peak_rss_child, args=args)
                child.start()
                child.join()
                if child.exitcode != 0:
                    raise RuntimeError(f"memory benchmark {part} at {n} images failed ({child.exitcode})")
                rows.append({"part": part, "images": n, "peak_rss_mib": round(q.get(), 1)})
    return rows


def web_captions(world: Path, n: int = 500) -> list[str]:
    """Some of the world's web captions: what a random model's tokenizer is trained on."""
    from capfilt.data.reader import iter_shard
    from capfilt.data.sample import Sample
    from capfilt.data.specs import expand_shards

    url = expand_shards([str(world / "web-*.tar")])[0]
    return [s.caption for s in iter_shard(url) if isinstance(s, Sample)][:n] + ["a picture of"]


def run_bench(
    cfg: Config,
    world: Path,
    models: Path | None,
    parts: list[str],
    random_models: bool = False,
    memory_sizes: tuple[int, ...] = (10_000, 100_000),
    address: str | None = None,
    processes: bool = False,
) -> dict:
    """The requested parts ("decode", "train", "round", "memory") on a demo world folder; the round joins
    the Ray cluster at ``address`` when given, runs on worker processes without Ray with ``processes``,
    else starts a local Ray as ``capfilt run`` does."""
    from capfilt.data.bench_decode import bench_decode

    world = Path(world)
    web = [str(world / "web-*.tar")]
    result: dict = {"machine": machine(), "config": cfg.name}
    if "decode" in parts:
        decoders = ["pillow", "dali"]
        result["decode"] = [bench_decode(web, d, image_size=cfg.run.image_size) for d in decoders]
    if "train" in parts:
        result["train"] = bench_train(cfg, [*web, str(world / "human-*.tar")])
    if "memory" in parts:
        result["memory"] = bench_memory(cfg, world, memory_sizes)
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
            result["round"] = bench.bench_round(
                fixed_threshold(cfg),
                web,
                *paths,
                truth=str(truth) if truth.exists() else None,
                address=address,
                processes=processes,
            )
    return result


def bench_device(
    cfg: Config,
    world: Path,
    device: str,
    batch_sizes: list[int],
    images: int,
    actors: list[int],
    address: str | None = None,
    processes: bool = False,
) -> tuple[dict, str]:
    """The GPU path, measured on ``device`` (it runs on the CPU too, at a small size): decode at the run's
    image size (Pillow, and DALI ``mixed`` on CUDA or DALI CPU), the captioner and the filter at the
    config's model size with random weights (bf16 on CUDA) over a batch-size sweep beside the batched HF
    script, and the end-to-end round with 1..n actors sharing the device: on a local Ray, the cluster at
    ``address``, or worker processes without Ray (``processes``). Without DALI installed, the DALI row is
    skipped and rounds the config gives to DALI decode with Pillow, both said on stderr. Returns the
    figures and a markdown table."""
    from capfilt.data.bench_decode import bench_decode
    from capfilt.data.decode import PillowDecoder
    from capfilt.data.reader import ShardReader
    from capfilt.data.specs import expand_shards
    from capfilt.run import bench
    from capfilt.run.hf_script import HFScript
    from capfilt.run.pipeline import decoded_batches
    from capfilt.run.round import run_round
    from capfilt.stages.captioner import Captioner
    from capfilt.stages.filter import Filter

    world, cuda = Path(world), device == "cuda"
    web = [str(world / "web-*.tar")]
    dtype = "bfloat16" if cuda else "float32"
    rows: list[tuple[str, str, float]] = []

    def add(row: tuple[str, str, float], detail: object = "") -> None:
        rows.append(row)
        print(f"[bench] {row[0]} | {row[1]} | {row[2]:,.1f} images/s {detail}", file=sys.stderr, flush=True)

    size, round_decoder = cfg.run.image_size, cfg.run.decoder
    for name in ("pillow", "dali"):
        label = {"pillow": "Pillow", "dali": "DALI mixed" if cuda else "DALI CPU"}[name]
        try:
            r = bench_decode(web, name, size, cfg.run.decode_threads, cfg.run.batch_size, images, 1, gpu=cuda)
        except ImportError as err:  # a GPU machine without DALI still measures the rest, rounds with Pillow
            round_decoder = "pillow"
            print(f"[bench] decode | {label}: skipped, {err}; rounds decode with Pillow", file=sys.stderr)
            continue
        add(("decode", f"{label}, {size} px, {r['threads']} thread(s)", r["images_per_s"]))
    with tempfile.TemporaryDirectory(prefix="capfilt-models-") as tmp:
        model_cfg = dataclasses.replace(cfg.model, image_size=size)
        cap_path, flt_path = bench.random_models(model_cfg, tmp, web_captions(world))
        decoder = PillowDecoder(size, 1, cfg.run.max_pixels)
        samples = [
            b for b in decoded_batches(ShardReader(expand_shards(web)[0]), decoder, images) if b.samples
        ]
        pixels, keys = samples[0].pixels.to(device), [s.key for s in samples[0].samples]
        web_text = [s.caption for s in samples[0].samples]
        ours = (
            Captioner(cap_path, cfg.caption, device, cfg.run.seed, dtype),
            Filter(flt_path, cfg.filter, device, dtype),
        )
        script = HFScript(cfg, cap_path, flt_path, device, dtype)
        for bs in batch_sizes:
            batches = [
                (pixels[i : i + bs], keys[i : i + bs], web_text[i : i + bs]) for i in range(0, len(keys), bs)
            ]
            pairs = {"captioner + filter": ours, "batched HF script": (script, script)}
            for who, ips in bench.model_images_per_s(pairs, batches).items():
                add(("model", f"{who}, batch {bs}, {dtype}", ips))
        del ours, script
        if cuda:  # the sweep's cached blocks (53 GB at batch 512) would leave the rounds' workers short
            gc.collect()
            torch.cuda.empty_cache()
        rounds = [("pillow", 1)] * (cuda and round_decoder != "pillow") + [(round_decoder, n) for n in actors]
        for decoder_name, n in rounds:
            run = copy.deepcopy(cfg)
            run.run.actors, run.run.dtype, run.run.decoder = n, dtype, decoder_name
            run.run.num_gpus_per_actor = 1 / n if cuda else 0.0
            out = f"{tmp}/round-{decoder_name}-{n}"
            summary = run_round(
                run, web, out, cap_path, flt_path, address=address, progress=False, processes=processes
            )["this_invocation"]
            who = "worker process(es)" if processes else "actor(s)"
            what = (
                f"end to end, {summary['n_in']:,} images, {n} {who} on one {device}, {decoder_name}, {dtype}"
            )
            add(("round", what, summary["images_per_s"]), summary["stage_seconds"])
    table = "\n".join(
        ["| part | what | images/s |", "| --- | --- | --- |"]
        + [f"| {p} | {w} | {v:,.1f} |" for p, w, v in rows]
    )
    return {"machine": machine(), "config": cfg.name, "device": device, "rows": rows}, table
