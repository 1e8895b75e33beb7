"""`capfilt bootstrap`: CapFilt rounds chained, each in its own folder, resumable step by step.

Round 0 pretrains a MED on web + human pairs and finetunes a captioner and a filter on the human pairs.
Round r >= 1 cleans the web shards with round r-1's captioner and filter (`capfilt run`), pretrains a new
MED on the cleaned + human shards (from scratch, as the paper does, or warm-started), finetunes and
evaluates. A step is done when its marker ``round-R/STEP.done`` exists, so a rerun resumes at the first
unfinished step, and the steps themselves resume inside (training checkpoints, the run's shard ledger).

Truth and labels are evaluation-only: they are not part of the folder's identity, and the eval markers
record the labels they used, so adding or changing ``--truth`` later re-runs only the evaluations.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from capfilt.config import Config, config_from_dict
from capfilt.errors import UserError


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


def _marker(round_dir: Path, step: str) -> Path:
    return round_dir / f"{step}.done"


def _check_manifest(out: Path, cfg: Config, plan: BootstrapPlan) -> None:
    """Record the config and inputs; refuse to resume a folder made with different ones.

    ``truth`` is recorded (the report reads it) but is not compared: it changes only the evaluations.
    """
    manifest = out / "manifest.json"
    want = {
        "config": cfg.to_dict(),
        "web": plan.web,
        "human": plan.human,
        "test": plan.test,
        "warm_start": plan.warm_start,
        "init": plan.init,
    }
    if manifest.is_file():
        have = json.loads(manifest.read_text())
        if config_from_dict(have["config"]).to_dict() != want["config"] or {
            k: have.get(k) for k in want if k != "config"
        } != {k: v for k, v in want.items() if k != "config"}:
            raise UserError(f"{out} holds a bootstrap with another config or inputs; use a new --out folder")
    out.mkdir(parents=True, exist_ok=True)
    manifest.write_text(json.dumps({**want, "truth": plan.truth, "rounds": plan.rounds}, indent=2))


def _step(
    round_dir: Path,
    step: str,
    fn: Callable[[], object],
    log: Callable[[str], None],
    inputs: dict | None = None,
) -> None:
    """Run one step unless its marker exists with the same ``inputs``; the marker records the inputs,
    its time and any dict it returned."""
    marker, inputs = _marker(round_dir, step), inputs or {}
    if marker.exists() and all(json.loads(marker.read_text()).get(k) == v for k, v in inputs.items()):
        log(f"{round_dir.name}: {step} already done")
        return
    log(f"{round_dir.name}: {step} ...")
    t0 = time.time()
    info = fn()
    info = info if isinstance(info, dict) else {}
    marker.write_text(json.dumps({"seconds": round(time.time() - t0, 1), **inputs, **info}, default=str))


def train_and_evaluate(
    cfg: Config,
    train_shards: list[str],
    plan: BootstrapPlan,
    rd: Path,
    init: Path | None = None,
    run_dir: Path | None = None,
    log: Callable[[str], None] = print,
) -> None:
    """Pretrain a MED on ``train_shards``, finetune a captioner and a filter on the human shards, and
    evaluate them on the test shards (and ``run_dir``'s cleaning against truth), each step resumable."""
    from capfilt.eval.report import evaluate_all
    from capfilt.train.finetune import finetune
    from capfilt.train.pretrain import pretrain

    rd.mkdir(parents=True, exist_ok=True)
    _step(rd, "pretrain", lambda: pretrain(cfg, train_shards, rd / "pretrain", init=init), log)
    _step(rd, "finetune", lambda: finetune(cfg, rd / "pretrain" / "med", plan.human, rd / "finetune"), log)
    _step(
        rd,
        "eval",
        lambda: {
            "metrics": evaluate_all(
                cfg,
                plan.test,
                captioner=rd / "finetune" / "captioner",
                filter_=rd / "finetune" / "filter",
                run_dir=run_dir,
                truth=plan.truth,
                out=rd / "eval.json",
            )
        },
        log,
        inputs={"truth": plan.truth},
    )


def clean(
    cfg: Config, plan: BootstrapPlan, models: Path, rd: Path, log: Callable[[str], None] = print
) -> Path:
    """`capfilt run` over the web shards with the captioner and filter in ``models``; returns the run folder."""
    from capfilt.run.round import run_round

    rd.mkdir(parents=True, exist_ok=True)
    _step(
        rd,
        "run",
        lambda: run_round(
            cfg,
            plan.web,
            str(rd / "run"),
            captioner=str(models / "captioner"),
            filter_=str(models / "filter"),
            local=plan.local,
            address=plan.address,
            new_run=False,
            human=plan.human,
        ),
        log,
    )
    return rd / "run"


def bootstrap(cfg: Config, plan: BootstrapPlan, out: Path, log: Callable[[str], None] = print) -> list[Path]:
    """Run round 0 and `plan.rounds` cleaning rounds into OUT/round-R; return the round folders."""
    out = Path(out)
    _check_manifest(out, cfg, plan)
    round_dirs = []
    for r in range(plan.rounds + 1):
        rd, prev = out / f"round-{r}", out / f"round-{r - 1}"
        run_dir = clean(cfg, plan, prev / "finetune", rd, log) if r > 0 else None
        train_shards = [str(run_dir / "*.tar"), *plan.human] if run_dir else plan.web + plan.human
        if r == 0:
            init = plan.init
        else:
            init = prev / "pretrain" / "med" if plan.warm_start else None
        train_and_evaluate(cfg, train_shards, plan, rd, init=init, run_dir=run_dir, log=log)
        round_dirs.append(rd)
    return round_dirs
