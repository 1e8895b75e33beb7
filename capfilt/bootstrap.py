"""`capfilt bootstrap`: CapFilt rounds chained, each in its own folder, resumable step by step.

Round 0 pretrains a MED on web + human pairs and finetunes a captioner and a filter on the human pairs.
Round r >= 1 cleans the web shards with round r-1's captioner and filter (`capfilt run`), pretrains a new
MED on the cleaned + human shards (from scratch, as the paper does, or warm-started), finetunes and
evaluates. A step is done when its marker ``round-R/STEP.done`` exists, so a rerun resumes at the first
unfinished step, and the steps themselves resume inside (training checkpoints, the run's shard ledger).

OUT may be a local folder or a URL (``s3://bucket/boot``). A remote OUT is worked on in a local scratch
copy (data/mirror.py): each training checkpoint is uploaded as it is written, each step's outputs before
its marker, and the cleaning runs write their shards to OUT directly; markers and the manifest are read
from OUT itself, so a rerun on a fresh machine resumes from what OUT holds.

Truth and labels are evaluation-only: they are not part of the folder's identity, and the eval markers
record the labels they used, so adding or changing ``--truth`` later re-runs only the evaluations.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from capfilt import jsonio
from capfilt.config import Config
from capfilt.data.mirror import Mirror
from capfilt.data.signing import unsigned
from capfilt.data.writer import atomic_open
from capfilt.errors import UserError
from capfilt.run.lease import Lease
from capfilt.run.ledger import read_json, with_defaults, write_json
from capfilt.train.checkpoint import LATEST


@dataclass
class BootstrapPlan:
    """The inputs of a bootstrap: shard specs per split, how many rounds, and how to start each MED."""

    web: list[str]
    human: list[str]
    test: list[str]
    rounds: int = 2  # cleaning rounds after round 0
    truth: str | None = None  # truth.parquet or a labels file, for evaluation only (optional)
    warm_start: bool = False  # round r's MED starts from round r-1's (the paper starts from scratch)
    init: str | None = (
        None  # round 0's MED starts from this MED folder (e.g. a released BLIP, `capfilt convert`)
    )
    local: bool = False  # run the cleaning in-process instead of on Ray
    address: str | None = None


def _check_manifest(out: str, cfg: Config, plan: BootstrapPlan) -> None:
    """Record the config and inputs; refuse to resume a folder made with different ones.

    ``truth`` is recorded (the report reads it) but is not compared: it changes only the evaluations.
    Shard URLs are recorded without a signature (``data.signing``): a resume with re-signed URLs is the
    same bootstrap.
    """
    manifest = f"{out}/manifest.json"
    want = {
        "config": cfg.to_dict(),
        "web": [unsigned(spec) for spec in plan.web],
        "human": [unsigned(spec) for spec in plan.human],
        "test": [unsigned(spec) for spec in plan.test],
        "warm_start": plan.warm_start,
        "init": plan.init,
    }
    have = read_json(manifest)
    if have is not None and (
        with_defaults(have["config"]) != want["config"]
        or {k: have.get(k) for k in want if k != "config"} != {k: v for k, v in want.items() if k != "config"}
    ):
        raise UserError(f"{out} holds a bootstrap with another config or inputs; use a new --out folder")
    write_json(manifest, {**want, "truth": plan.truth, "rounds": plan.rounds})


def _step(
    mirror: Mirror,
    round_dir: Path,
    step: str,
    fn: Callable[[], object],
    log: Callable[[str], None],
    inputs: dict | None = None,
    outputs: tuple[str, ...] = (),
    lease: Lease | None = None,
) -> None:
    """Run one step unless its marker exists with the same ``inputs``; then upload its ``outputs`` (names
    in ``round_dir``) and write the marker, which records the inputs, its time and any dict it returned.
    With the bootstrap's ``lease``: raise ``LeaseLost`` instead of starting the step, or instead of
    marking it done, once another job has taken the bootstrap over (the eval step holds no lease itself)."""
    marker, inputs = f"{mirror.url_of(round_dir)}/{step}.done", inputs or {}
    have = read_json(marker)
    if have is not None and all(have.get(k) == v for k, v in inputs.items()):
        log(f"{round_dir.name}: {step} already done")
        return
    if lease:
        lease.check()
    log(f"{round_dir.name}: {step} ...")
    t0 = time.time()
    info = fn()
    info = info if isinstance(info, dict) else {}
    if lease:
        lease.check()
    for name in outputs:
        mirror.push(round_dir / name)
    with atomic_open(marker) as f:
        f.write(jsonio.dumps({"seconds": round(time.time() - t0, 1), **inputs, **info}, default=str).encode())


def train_and_evaluate(
    cfg: Config,
    train_shards: list[str],
    plan: BootstrapPlan,
    rd: Path,
    init: Path | None = None,
    run_dir: str | None = None,
    log: Callable[[str], None] = print,
    mirror: Mirror | None = None,
    lease: Lease | None = None,
) -> None:
    """Pretrain a MED on ``train_shards``, finetune a captioner and a filter on the human shards, and
    evaluate them on the test shards (and ``run_dir``'s cleaning against truth), each step resumable.
    ``rd`` is in ``mirror``'s working copy (default: a local folder, its own mirror); ``lease``: the
    bootstrap's, checked around each step (``_step``)."""
    from capfilt.eval.report import evaluate_all
    from capfilt.train.finetune import finetune
    from capfilt.train.pretrain import pretrain

    mirror = mirror or Mirror(rd)
    rd.mkdir(parents=True, exist_ok=True)
    pre, fin = rd / "pretrain", rd / "finetune"
    _step(
        mirror,
        rd,
        "pretrain",
        lambda: pretrain(cfg, train_shards, pre, init, mirror.upload_url(pre)),
        log,
        outputs=("pretrain",),
        lease=lease,
    )
    _step(
        mirror,
        rd,
        "finetune",
        lambda: finetune(cfg, pre / "med", plan.human, fin, mirror.upload_url(fin)),
        log,
        outputs=("finetune",),
        lease=lease,
    )
    _step(
        mirror,
        rd,
        "eval",
        lambda: {
            "metrics": evaluate_all(
                cfg,
                plan.test,
                captioner=fin / "captioner",
                filter_=fin / "filter",
                run_dir=run_dir,
                truth=plan.truth,
                out=rd / "eval.json",
            )
        },
        log,
        inputs={"truth": plan.truth},
        outputs=("eval.json",),
        lease=lease,
    )


def clean(
    cfg: Config,
    plan: BootstrapPlan,
    models: Path,
    rd: Path,
    log: Callable[[str], None] = print,
    mirror: Mirror | None = None,
    lease: Lease | None = None,
) -> str:
    """`capfilt run` over the web shards with the captioner and filter in ``models``; returns the run
    folder, ``rd/run`` on ``mirror``'s side (its shards go there directly, each resumable on its own).
    A shard that failed stops the bootstrap before the step is marked done: the next model would train
    on part of the round without a word, and a rerun retries only the failed shards."""
    from capfilt.run.progress import failed_note
    from capfilt.run.round import run_round

    mirror = mirror or Mirror(rd)
    run_dir = mirror.url_of(rd / "run")
    rd.mkdir(parents=True, exist_ok=True)

    def run() -> dict:
        summary = run_round(
            cfg,
            plan.web,
            run_dir,
            captioner=str(models / "captioner"),
            filter_=str(models / "filter"),
            local=plan.local,
            address=plan.address,
            new_run=False,
            human=plan.human,
        )
        if summary["failed_shards"]:
            raise UserError(f"{rd.name}'s cleaning: {failed_note(summary)}")
        return summary

    _step(mirror, rd, "run", run, log, lease=lease)
    return run_dir


def bootstrap(
    cfg: Config, plan: BootstrapPlan, out: str | Path, log: Callable[[str], None] = print
) -> list[str]:
    """Run round 0 and `plan.rounds` cleaning rounds into OUT/round-R; return the round folders."""
    if plan.rounds and cfg.finetune.image_size != cfg.run.image_size:  # else round 1 fails hours from now
        raise UserError(
            f"the cleaning rounds run the finetuned models, whose ViT takes finetune.image_size "
            f"({cfg.finetune.image_size}) px images, but run.image_size is {cfg.run.image_size}: set them equal"
        )
    if cfg.run.keep_actors:  # each round's would hold the cluster the next round's actors need
        raise UserError(
            "run.keep_actors keeps actors for later rounds with the same models; each bootstrap round cleans "
            "with new ones, so its warm actors would only hold the resources the next round needs"
        )
    mirror = Mirror(out)
    # a scheduled bootstrap that overlaps the last one would train into its folders
    with Lease(mirror.url) as lease:
        _check_manifest(mirror.url, cfg, plan)
        mirror.pull(skip_dirs=("run",), pointer=LATEST)
        round_dirs = []
        for r in range(plan.rounds + 1):
            rd, prev = mirror.local / f"round-{r}", mirror.local / f"round-{r - 1}"
            run_dir = clean(cfg, plan, prev / "finetune", rd, log, mirror, lease) if r > 0 else None
            train_shards = [f"{run_dir}/*.tar", *plan.human] if run_dir else plan.web + plan.human
            if r == 0:
                init = plan.init
            else:
                init = prev / "pretrain" / "med" if plan.warm_start else None
            train_and_evaluate(
                cfg, train_shards, plan, rd, init=init, run_dir=run_dir, log=log, mirror=mirror, lease=lease
            )
            round_dirs.append(mirror.url_of(rd))
    return round_dirs
