"""Measure a CapFilt round against what a user would write instead, on the same shards.

The baseline is the batched script a competent user writes with transformers alone
(:class:`capfilt.run.hf_script.HFScript`). The one-image loop is the same script with batches of one. Both
are compared with capfilt twice: model only (decoded batches in memory, ``Captioner.caption`` +
``Filter.score`` against the script's two calls; once more with ``filter.itc: false``, which does the
script's work: capfilt also scores ITC by default) and end to end (read, decode, caption, score, select,
write the same outputs). End to end is measured two ways:
- in this process: ``run_round``, as ``capfilt run`` does, against the script's loop, with both libraries
  already imported here (capfilt still starts Ray and its actors import torch; the script imports nothing);
- as commands, as users run them: ``capfilt run`` against ``python -m capfilt.run.hf_script``, each a fresh
  process timed from launch to exit, so each pays its own imports and start-up.
Used for docs/BENCHMARKS.md; not a test of speed.
"""

from __future__ import annotations

import dataclasses
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import yaml

from capfilt.config import Config, ConfigError, ModelConfig
from capfilt.data.decode import PillowDecoder
from capfilt.data.reader import ShardReader
from capfilt.data.specs import expand_shards
from capfilt.model.hf import export_captioner, export_filter
from capfilt.run import ledger
from capfilt.run.hf_script import HFScript, script_round
from capfilt.run.pipeline import decoded_batches
from capfilt.run.round import run_round
from capfilt.stages.captioner import Captioner
from capfilt.stages.filter import Filter


def random_models(model: ModelConfig, out: str | Path, captions: list[str]) -> tuple[str, str]:
    """A captioner and a filter with random weights at ``model``'s size, for timing where no trained ones
    exist (a random captioner seldom writes [SEP], so its captions run to ``max_length``)."""
    from transformers import BertTokenizer

    from capfilt.model.med import MED
    from capfilt.model.tokenizer import DEC_TOKEN, ENC_TOKEN, train_tokenizer

    vocab = train_tokenizer(captions, min(model.vocab_size, 1000)).get_vocab()
    vocab |= {
        f"[unused{i}]": len(vocab) + i for i in range(model.vocab_size - len(vocab))
    }  # full-size LM head
    tok = BertTokenizer(vocab=vocab, bos_token=DEC_TOKEN, extra_special_tokens=[ENC_TOKEN])
    torch.manual_seed(0)
    med = MED.from_config(model, tok)
    out = Path(out)
    return str(export_captioner(med, tok, out / "captioner")), str(export_filter(med, tok, out / "filter"))


def model_images_per_s(pairs: dict[str, tuple[Any, Any]], batches: list) -> dict[str, float]:
    """Images/s of each (captioner, filter) pair on the same decoded batches, after one warm-up batch each.

    The pairs take turns batch by batch, so a change in the machine's speed during the measurement (this
    project's 2-core machine drifts by 10-20 % within minutes) falls on all of them alike; timed one after
    the other, the ratio between two pairs moved by half between runs (docs/BENCHMARKS.md).
    """
    seconds = dict.fromkeys(pairs, 0.0)
    for i, (pixels, keys, web) in enumerate([batches[0], *batches]):
        for name, (cap, flt) in pairs.items():
            start = time.perf_counter()
            caps = cap.caption(pixels, keys)
            flt.score(pixels, [[w, *c] for w, c in zip(web, caps)])
            if i > 0:
                seconds[name] += time.perf_counter() - start
    images = sum(len(keys) for _, keys, _ in batches)
    return {name: images / s for name, s in seconds.items()}


def timed(fn, *args, **kwargs) -> tuple[Any, float]:
    start = time.perf_counter()
    result = fn(*args, **kwargs)
    return result, time.perf_counter() - start


def command_seconds(argv: list[str]) -> float:
    """Wall seconds of a command from launch to exit, as a user's shell sees it; raises if it fails."""
    start = time.perf_counter()
    done = subprocess.run(argv, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(argv[:4])}... exited {done.returncode}: {done.stderr[-3000:]}")
    return time.perf_counter() - start


def where_to_run(local: bool, address: str | None, processes: bool) -> tuple[list[str], str]:
    """The ``capfilt run`` options that run the round there, and how the result names its Ray."""
    if local:
        return ["--local"], "in-process"
    if processes:
        return ["--processes"], "none: worker processes"
    if address:
        return ["--address", address], f"joined {address}"
    return [], "started locally"


def commands(
    cfg: Config, shards: list[str], out: str, captioner: str, filter_: str, where: list[str]
) -> tuple[list[str], list[str]]:
    """``capfilt run`` (with the options ``where`` it runs) and the HF script's command on the same shards
    and config (written to ``out``)."""
    config = Path(out) / "config.yaml"
    config.parent.mkdir(parents=True, exist_ok=True)
    config.write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    ours = [sys.executable, "-m", "capfilt.cli", "run", *shards, "--out", f"{out}/capfilt", "-c", str(config)]
    ours += ["--captioner", captioner, "--filter", filter_]
    ours += where
    script = [sys.executable, "-m", "capfilt.run.hf_script", str(config), captioner, filter_, f"{out}/hf"]
    return ours, [*script, *shards]


def bench_round(
    cfg: Config,
    shards: list[str],
    captioner: str,
    filter_: str,
    truth: str | None = None,
    model_images: int = 1024,
    one_image: list[str] | None = None,
    local: bool = False,
    address: str | None = None,
    processes: bool = False,
) -> dict[str, Any]:
    """Model-only and end-to-end images/s of capfilt, the batched HF script and the one-image loop, their
    ratios, capfilt's wall time against its model time, and the filter's precision/recall given ``truth``.
    The one-image loop, the slowest, runs on ``one_image`` (default: the first shard) for its rate.
    capfilt's round starts a local Ray, or joins the cluster at ``address`` (``auto``: a running one), where
    a scheduled job pays neither Ray's start nor its shutdown, or runs on worker processes without Ray
    (``processes``), or in this process (``local``)."""
    if cfg.run.actors == "auto":
        raise ConfigError("bench_round compares per-actor model time: set a fixed run.actors")
    urls, bs = expand_shards(shards), cfg.run.batch_size
    decoder, batches = PillowDecoder(cfg.run.image_size, 1, cfg.run.max_pixels), []
    for batch in decoded_batches(ShardReader(urls[0]), decoder, bs):
        if batch.samples and sum(len(k) for _, k, _ in batches) < model_images:
            batches.append((batch.pixels, [s.key for s in batch.samples], [s.caption for s in batch.samples]))
    ours = (Captioner(captioner, cfg.caption, seed=cfg.run.seed), Filter(filter_, cfg.filter))
    itm_only = (ours[0], Filter(filter_, dataclasses.replace(cfg.filter, itc=False)))  # the script's work
    script = HFScript(cfg, captioner, filter_)
    pairs = {"capfilt": ours, "capfilt_itm_only": itm_only, "hf_script": (script, script)}
    model = model_images_per_s(pairs, batches)
    del ours, itm_only, script

    tmp = tempfile.mkdtemp(prefix="capfilt-bench-")
    try:
        summary, ours_s = timed(
            run_round,
            cfg,
            shards,
            f"{tmp}/capfilt",
            captioner,
            filter_,
            local,
            address,
            progress=False,
            processes=processes,
        )
        run = summary["this_invocation"]
        n_script, script_s = timed(
            lambda: script_round(cfg, urls, f"{tmp}/hf", HFScript(cfg, captioner, filter_), bs)
        )
        where, ray = where_to_run(local, address, processes)
        ours_cmd, script_cmd = commands(cfg, shards, f"{tmp}/commands", captioner, filter_, where)
        ours_cmd_s, script_cmd_s = command_seconds(ours_cmd), command_seconds(script_cmd)
        n_one, one_s = timed(
            lambda: script_round(
                cfg, one_image or urls[:1], f"{tmp}/one", HFScript(cfg, captioner, filter_), 1
            )
        )
        actors = 1 if local else min(cfg.run.actors, len(urls))

        def model_seconds(stage: dict[str, float]) -> float:
            """A worker's model time: the caption and score stages, summed over the workers, per worker."""
            return (stage.get("caption", 0.0) + stage.get("score", 0.0)) / actors

        stage = run["stage_seconds"]
        model_s = model_seconds(stage)
        command = ledger.read_json(f"{tmp}/commands/capfilt/{ledger.SUMMARY}")
        command_model_s = model_seconds(command["this_invocation"]["stage_seconds"])  # its own, same run
        e2e = {
            "capfilt_run": run["n_in"] / ours_s,
            "hf_script": n_script / script_s,
            "one_image": n_one / one_s,
            "capfilt_run_command": run["n_in"] / ours_cmd_s,
            "hf_script_command": n_script / script_cmd_s,
        }
        result: dict[str, Any] = {
            "images": run["n_in"],
            "ray": ray,
            "model_images": sum(len(k) for _, k, _ in batches),
            "model_images_per_s": model,
            "e2e_images_per_s": e2e,
            "ratios": {
                "model_vs_hf_script": model["capfilt"] / model["hf_script"],
                "model_itm_only_vs_hf_script": model["capfilt_itm_only"] / model["hf_script"],
                "e2e_vs_hf_script": e2e["capfilt_run"] / e2e["hf_script"],
                "e2e_vs_one_image": e2e["capfilt_run"] / e2e["one_image"],
                "e2e_commands_vs_hf_script": e2e["capfilt_run_command"] / e2e["hf_script_command"],
                "wall_over_model_time": ours_s / model_s if model_s else None,
                "command_wall_over_model_time": ours_cmd_s / command_model_s if command_model_s else None,
            },
            "stage_seconds": stage,
            "startup_seconds": run["startup_seconds"],
            "close_seconds": run["close_seconds"],
            "kept_rate": summary["kept_rate"],
            "kept_rate_by_source": summary["kept_rate_by_source"],
        }
        if truth:
            from capfilt.eval.filtering import round_metrics

            result["filter"] = round_metrics(f"{tmp}/capfilt", truth, cfg.filter.threshold)
        return result
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
