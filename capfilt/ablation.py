"""`make ablation`: the paper's CapFilt ablation, reproduced on the demo world (docs/RESULTS.md).

Per seed, every variant is pretrained, finetuned and evaluated the same way (`train_and_evaluate`); only
its training captions differ:

- noisy: web + human as crawled (bootstrap round 0);
- +captioner: every web caption plus every synthetic caption, nothing filtered;
- +filter: the web captions the filter keeps, no synthetic ones;
- capfilt: web and synthetic captions the filter keeps (bootstrap round 1), with nucleus sampling;
- capfilt-beam: the same with beam-search captions;
- capfilt-2rounds: a second round, cleaned with round 1's captioner and filter (bootstrap round 2);
- oracle: the true clean caption of every web image (truth.parquet; evaluation-only data).

The variants are selection policies over ONE scored run, so the captioner and filter are identical across
them, as in the paper's table.
"""

from __future__ import annotations

import copy
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pyarrow.parquet as pq

from capfilt.bootstrap import bootstrap, clean, train_and_evaluate
from capfilt.config import Config
from capfilt.data.reader import iter_shard
from capfilt.data.sample import Candidate, Sample
from capfilt.data.specs import expand_shards
from capfilt.data.writer import output_name, write_samples_shard
from capfilt.demo import world_plan
from capfilt.errors import UserError
from capfilt.run.calibration import threshold_used
from capfilt.stages.select import passes

Policy = Callable[[list[dict], float], list[str]]


def _passes(candidate: dict, threshold: float) -> bool:
    return passes(Candidate(candidate["text"], candidate["source"], candidate["itm"]), threshold)


def keep_all(candidates: list[dict], threshold: float) -> list[str]:
    """+captioner: the web caption and every synthetic caption, unfiltered (but never an empty one)."""
    return [c["text"] for c in candidates if c["text"].strip()]


def keep_web_matched(candidates: list[dict], threshold: float) -> list[str]:
    """+filter: the web caption when the filter keeps it; synthetic captions are not used."""
    return [c["text"] for c in candidates if c["source"] == "web" and _passes(c, threshold)]


def keep_matched(candidates: list[dict], threshold: float) -> list[str]:
    """CapFilt: every caption, web or synthetic, the filter keeps (stages/select.py's rule)."""
    return [c["text"] for c in candidates if _passes(c, threshold)]


def write_caption_shards(shards: list[str], captions: dict[str, list[str]], out: Path) -> int:
    """Input-style shards of the samples that have captions: original image, json["captions"] = the list.

    The training loader yields one pair per entry of json["captions"]. Returns the number of pairs.
    """
    out.mkdir(parents=True, exist_ok=True)
    pairs = 0
    for url in shards:
        samples = []
        for item in iter_shard(url):
            if isinstance(item, Sample) and captions.get(item.key):
                texts = captions[item.key]
                samples.append(
                    Sample(
                        key=item.key,
                        shard=url,
                        image=item.image,
                        image_ext=item.image_ext,
                        caption=texts[0],
                        meta={"captions": texts},
                    )
                )
                pairs += len(texts)
        write_samples_shard(str(out / f"{output_name(url, shards)}.tar"), samples)
    return pairs


def policy_captions(run_dir: Path, policy: Policy, threshold: float) -> dict[str, list[str]]:
    """key → the captions a policy keeps, from a finished run's stored scores (no model)."""
    kept: dict[str, list[str]] = {}
    for path in sorted(Path(run_dir).glob("*.scores.parquet")):
        for row in pq.read_table(path, columns=["key", "candidates"]).to_pylist():
            kept[row["key"]] = policy(row["candidates"], threshold)
    return kept


def oracle_captions(truth: str) -> dict[str, list[str]]:
    rows = pq.read_table(truth, columns=["key", "split", "clean_caption"]).to_pylist()
    return {r["key"]: [r["clean_caption"]] for r in rows if r["split"] == "web"}


def _seeded(cfg: Config, seed: int) -> Config:
    cfg = copy.deepcopy(cfg)
    cfg.pretrain.seed = cfg.finetune.seed = cfg.run.seed = seed
    return cfg


def run_seed(
    cfg: Config, world: Path, out: Path, log: Callable[[str], None] = print, local: bool = False
) -> dict[str, Path]:
    """All variants for one seed; returns variant → folder holding its eval.json. ``local`` runs the
    cleaning in-process instead of on Ray."""
    plan = world_plan(world, rounds=2, local=local)
    boot = out / "boot"
    rounds = [Path(r) for r in bootstrap(cfg, plan, boot, log=log)]
    beam_cfg = copy.deepcopy(cfg)
    beam_cfg.caption.method = "beam"
    beam_run = Path(clean(beam_cfg, plan, rounds[0] / "finetune", out / "beam", log=log))
    web = expand_shards(plan.web)
    threshold = threshold_used(str(rounds[1] / "run"))[0]  # the round's, calibrated or not
    variants = {
        "+captioner": policy_captions(rounds[1] / "run", keep_all, threshold),
        "+filter": policy_captions(rounds[1] / "run", keep_web_matched, threshold),
        "capfilt-beam": policy_captions(beam_run, keep_matched, threshold_used(str(beam_run))[0]),
        "oracle": oracle_captions(plan.truth),
    }
    folders = {"noisy": rounds[0], "capfilt": rounds[1], "capfilt-2rounds": rounds[2]}
    for name, captions in variants.items():
        vd = out / name
        data = vd / "data"
        if not (vd / "data.done").exists():
            pairs = write_caption_shards(web, captions, data)
            (vd / "data.done").write_text(json.dumps({"pairs": pairs}))
        train_and_evaluate(cfg, [str(data / "*.tar"), *plan.human], plan, vd, log=log)
        folders[name] = vd
    return folders


ORDER = ["noisy", "+captioner", "+filter", "capfilt", "capfilt-beam", "capfilt-2rounds", "oracle"]
METRICS = [
    ("TR@1", "retrieval", "tr@1"),
    ("IR@1", "retrieval", "ir@1"),
    ("TR@5", "retrieval", "tr@5"),
    ("IR@5", "retrieval", "ir@5"),
    ("CIDEr", "captioning", "cider"),
    ("attr acc", "captioning", "attribute_accuracy"),
]


def r1(ev: dict) -> float:
    """Mean of TR@1 and IR@1: the number the gap is measured on."""
    return (ev["retrieval"]["tr@1"] + ev["retrieval"]["ir@1"]) / 2


# Student's t quantile t(0.975, df) for a 95 % interval of a mean over a few seeds.
T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}


def mean_ci(vals: list[float]) -> tuple[float, float]:
    """Mean and the half-width of its 95 % t-interval (0 for one value: no spread to estimate)."""
    m = statistics.mean(vals)
    if len(vals) < 2:
        return m, 0.0
    return m, T975.get(len(vals) - 1, 1.96) * statistics.stdev(vals) / len(vals) ** 0.5


def _pm(vals: list[float], digits: int = 3) -> str:
    m, h = mean_ci(vals)
    return f"{m:.{digits}f} ± {h:.{digits}f}"


def results_markdown(evals: dict[int, dict[str, dict]], command: str) -> str:
    """The RESULTS.md table (mean ± 95 % interval over seeds), paired R@1 differences, and the gap closed.

    Differences are paired by seed (same world, same seed, different captions), which removes the
    seed-to-seed spread that both variants share.
    """
    seeds = sorted(evals)
    lines = [
        "| variant | " + " | ".join(m for m, _, _ in METRICS) + " | R@1 mean | R@1 per seed |",
        "|---" * (len(METRICS) + 3) + "|",
    ]
    for v in ORDER:
        cells = [_pm([evals[s][v][section][key] for s in seeds]) for _, section, key in METRICS]
        per_seed = [r1(evals[s][v]) for s in seeds]
        lines.append(
            f"| {v} | "
            + " | ".join(cells)
            + f" | {_pm(per_seed)} | {', '.join(f'{x:.3f}' for x in per_seed)} |"
        )
    diffs = ["", "| R@1 difference (paired by seed) | mean ± 95 % | outside the interval |", "|---|---|---|"]
    for a, b in [(v, "noisy") for v in ORDER if v != "noisy"] + [("capfilt", "capfilt-beam")]:
        d = [r1(evals[s][a]) - r1(evals[s][b]) for s in seeds]
        m, h = mean_ci(d)
        diffs.append(f"| {a} − {b} | {m:+.3f} ± {h:.3f} | {'yes' if abs(m) > h else 'no'} |")
    gaps = []
    for s in seeds:
        base, capf, oracle = (r1(evals[s][v]) for v in ("noisy", "capfilt", "oracle"))
        # Only defined when the oracle beats the noisy baseline: otherwise there is no gap to close.
        gaps.append((capf - base) / (oracle - base) if oracle > base else None)
    defined = [g for g in gaps if g is not None]
    gap_text = ", ".join(
        f"seed {s}: " + (f"{g:.2f}" if g is not None else "undefined (oracle ≤ noisy)")
        for s, g in zip(seeds, gaps)
    )
    mean_text = f"mean {_pm(defined, 2)} over {len(defined)} seed(s)" if defined else "defined for no seed"
    return "\n".join(
        [
            *lines,
            *diffs,
            "",
            f"Share of the R@1 gap (noisy → oracle) that CapFilt closes: {gap_text} ({mean_text}).",
            "",
            f"Command: `{command}`",
        ]
    )


def ensure_world(cfg: Config, world: Path) -> None:
    """Write the ablation's world with the config's synth settings unless it is there."""
    from capfilt.data.synth import write_world

    if not (Path(world) / "truth.parquet").is_file():
        write_world(str(world), cfg.synth)


POLL_S = 2.0  # how often run_side_by_side looks at its seed processes


def run_side_by_side(args: list[str], seeds: list[int], parallel: int, out: Path) -> None:
    """``capfilt ablation ARGS --seeds S`` for each seed in a process of its own, ``parallel`` at a time,
    the cores split between them as torch threads; seed S's output goes to OUT/seed-S.log and its own
    table to OUT/seed-S.md. The world must exist first (they would all write it). Why: at the demo's size
    one-thread processes side by side train about 1.3x faster together than one process with two threads
    (docs/RESULTS.md, the ablation's wall time). Each step resumes from its marker, so a rerun of the
    whole ablation afterwards only puts the table together."""
    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // parallel))}
    env["PYTHONFAULTHANDLER"] = "1"  # a seed that crashes in native code logs each thread's Python stack
    out.mkdir(parents=True, exist_ok=True)
    queue, running, failed = list(seeds), [], []
    while queue or running:
        while queue and len(running) < parallel:
            seed = queue.pop(0)
            cmd = [sys.executable, "-m", "capfilt.cli", "ablation", *args, "--seeds", str(seed)]
            cmd += ["--results", str(out / f"seed-{seed}.md")]
            log = out / f"seed-{seed}.log"
            with open(log, "w") as f:  # the child keeps its own handle
                proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env)
            running.append((seed, log, proc))
        time.sleep(POLL_S)
        for job in [j for j in running if j[2].poll() is not None]:
            running.remove(job)
            if job[2].returncode:
                failed.append(f"seed {job[0]} (exit {job[2].returncode}, log {job[1]})")
    if failed:
        raise UserError("ablation failed for " + ", ".join(failed))


def run_ablation(
    cfg: Config,
    world: Path,
    out: Path,
    seeds: list[int],
    log: Callable[[str], None] = print,
    local: bool = False,
) -> str:
    """Every variant for every seed (``run_seed``), then the markdown table of their evaluations."""
    world, out = Path(world), Path(out)
    ensure_world(cfg, world)
    evals: dict[int, dict[str, dict]] = {}
    for seed in seeds:
        folders = run_seed(_seeded(cfg, seed), world, out / f"seed-{seed}", log=log, local=local)
        evals[seed] = {v: json.loads((d / "eval.json").read_text()) for v, d in folders.items()}
    (out / "evals.json").write_text(json.dumps(evals, indent=2))
    return results_markdown(
        evals, f"capfilt ablation --config {cfg.name} --seeds {','.join(map(str, seeds))}"
    )


BEGIN, END = "<!-- ablation:begin -->", "<!-- ablation:end -->"


def update_results(path: Path, table: str) -> None:
    """Put the generated table between the markers of RESULTS.md, keeping the prose around it."""
    block = f"{BEGIN}\n{table}\n{END}"
    text = path.read_text() if path.is_file() else f"# Results\n\n{BEGIN}\n{END}\n"
    if BEGIN not in text:
        text += f"\n{BEGIN}\n{END}\n"
    head, rest = text.split(BEGIN, 1)
    path.write_text(head + block + rest.split(END, 1)[1])
