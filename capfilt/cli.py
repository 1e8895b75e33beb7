"""The ``capfilt`` command line: thin wrappers over the library.

Each command parses its options, loads the typed config and calls one library function. Imports are
inside the commands so that ``capfilt --help`` does not pay for torch and ray. A ``UserError`` from any
command is one line on stderr and exit code 2; anything else is a bug and keeps its traceback (without
local variables, which can be whole tensors). SIGTERM exits 143 through the command's cleanup, as
Ctrl-C exits 130.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from typer.core import TyperGroup

from capfilt.errors import UserError
from capfilt.signals import sigterm_exits


class _Commands(TyperGroup):
    """Every command, with the user's mistakes turned into one line and exit code 2."""

    def invoke(self, ctx):
        try:
            with sigterm_exits():  # a scheduler's stop runs the command's cleanup (capfilt/signals.py)
                return super().invoke(ctx)
        except UserError as err:
            typer.echo(f"capfilt: error: {err}", err=True)
            raise typer.Exit(2) from None


app = typer.Typer(
    cls=_Commands, add_completion=False, no_args_is_help=True, pretty_exceptions_show_locals=False
)

ConfigOpt = Annotated[str, typer.Option("--config", "-c", help="config name in configs/ or a YAML path")]
MODEL_HELP = "folder, or HF hub id org/name or org/name@rev (from the local cache)"
LABELS_HELP = (
    "evaluation only: truth.parquet (demo world) or a labels Parquet with key, noisy [, split, noise_type]"
)
SetOpt = Annotated[
    list[str] | None, typer.Option("--set", help="override a config value: section.key=value (repeatable)")
]


def echo_json(obj: dict) -> None:
    """A command's result on stdout as JSON (what summary.json holds), for ``jq`` and schedulers' logs."""
    from capfilt import jsonio

    typer.echo(jsonio.dumps(obj, indent=1))


def _config(name: str, overrides: list[str] | None):
    from capfilt.config import load_config

    return load_config(name, overrides or [])


@app.command()
def synth(
    out: Annotated[str, typer.Argument(help="output folder or fsspec URL")],
    config: ConfigOpt = "demo",
    set_: SetOpt = None,
):
    """Write the synthetic demo world: web/human/test WebDataset shards plus truth.parquet."""
    from capfilt.data.synth import write_world

    summary = write_world(out, _config(config, set_).synth)
    typer.echo(summary)


@app.command()
def inspect(
    urls: Annotated[list[str], typer.Argument(help="shard URLs, brace patterns, globs or list files")],
    samples: Annotated[int, typer.Option(help="example samples to print")] = 3,
):
    """Counts, reject reasons and a few samples of input or output shards."""
    from capfilt.data.inspect import inspect_shards

    typer.echo(inspect_shards(urls, samples=samples))


@app.command("model-info")
def model_info(config: ConfigOpt = "blip-base", set_: SetOpt = None):
    """Parameter counts of the MED, the captioner and the filter a config builds."""
    from capfilt.model.info import describe

    typer.echo(describe(_config(config, set_)))


@app.command()
def pretrain(
    shards: Annotated[list[str], typer.Argument(help="training shards (cleaned round output and human)")],
    out: Annotated[Path, typer.Option("--out", "-o", help="checkpoint folder")],
    config: ConfigOpt = "demo",
    set_: SetOpt = None,
    init: Annotated[Path | None, typer.Option(help="warm start from this MED checkpoint")] = None,
    workers: Annotated[int | None, typer.Option(help="data-parallel Ray Train workers")] = None,
):
    """Pretrain a MED with ITC + ITM + LM; resumes from the last checkpoint in OUT."""
    from capfilt.train.pretrain import pretrain as run_pretrain

    cfg = _config(config, set_)
    if workers is not None:
        cfg.pretrain.workers = workers
    run_pretrain(cfg, shards, out, init=init)


@app.command()
def finetune(
    med: Annotated[Path, typer.Argument(help="MED checkpoint folder")],
    shards: Annotated[list[str], typer.Argument(help="human-annotated shards")],
    out: Annotated[Path, typer.Option("--out", "-o", help="folder for captioner/ and filter/")],
    config: ConfigOpt = "demo",
    set_: SetOpt = None,
    workers: Annotated[int | None, typer.Option(help="data-parallel Ray Train workers")] = None,
):
    """Finetune a captioner (LM) and a filter (ITC+ITM) from one MED; they share no parameters."""
    from capfilt.train.finetune import finetune as run_finetune

    cfg = _config(config, set_)
    if workers is not None:
        cfg.finetune.workers = workers
    run_finetune(cfg, med, shards, out)


@app.command("eval")
def evaluate(
    test: Annotated[
        list[str] | None,
        typer.Argument(help="held-out shards with reference captions (for --captioner/--filter)"),
    ] = None,
    captioner: Annotated[str | None, typer.Option(help=f"captioner {MODEL_HELP}")] = None,
    filter_: Annotated[str | None, typer.Option("--filter", help=f"filter {MODEL_HELP}")] = None,
    run_dir: Annotated[
        Path | None, typer.Option("--run", help="a finished round, scored against --labels")
    ] = None,
    truth: Annotated[str | None, typer.Option("--truth", "--labels", help=LABELS_HELP)] = None,
    config: ConfigOpt = "demo",
    set_: SetOpt = None,
    out: Annotated[Path | None, typer.Option(help="write the metrics as JSON here")] = None,
    rerank_k: Annotated[
        int | None,
        typer.Option(
            min=1, help="ITC candidates per query that ITM reranks (16 by default; BLIP's COCO protocol: 256)"
        ),
    ] = None,
):
    """Retrieval R@k, captioning BLEU-4/CIDEr (attribute accuracy on the demo world), filter precision/recall
    against labels."""
    from capfilt.eval.report import evaluate_all

    models = captioner is not None or filter_ is not None
    if run_dir is not None and truth is None:
        raise UserError("--run is scored against labels: pass --labels (a Parquet of key, noisy)")
    if models and not test:
        raise UserError("--captioner and --filter are evaluated on held-out shards: pass them (TEST...)")
    if not models and run_dir is None:
        raise UserError("nothing to evaluate: pass TEST shards with --captioner and/or --filter, or --run")
    metrics = evaluate_all(
        _config(config, set_),
        test or [],
        captioner=captioner,
        filter_=filter_,
        run_dir=run_dir,
        truth=truth,
        out=out,
        rerank_k=rerank_k,
    )
    echo_json(metrics)


@app.command()
def run(
    shards: Annotated[list[str], typer.Argument(help="web shards to clean")],
    out: Annotated[str, typer.Option("--out", "-o", help="run folder or fsspec URL")],
    captioner: Annotated[str, typer.Option(help=f"captioner {MODEL_HELP}")],
    filter_: Annotated[str, typer.Option("--filter", help=f"filter {MODEL_HELP}")],
    config: ConfigOpt = "demo",
    set_: SetOpt = None,
    local: Annotated[bool, typer.Option(help="run in this process, no Ray (debugging)")] = False,
    processes: Annotated[
        bool, typer.Option(help="run.actors worker processes on this machine, no Ray: no Ray start or stop")
    ] = False,
    address: Annotated[
        str | None, typer.Option(help="Ray cluster address; default starts a local Ray")
    ] = None,
    new_run: Annotated[
        bool, typer.Option(help="allow a different config/model in an existing run folder")
    ] = False,
    human: Annotated[
        list[str] | None, typer.Option(help="human shards to calibrate the threshold (filter.calibration)")
    ] = None,
    dry_run: Annotated[
        bool, typer.Option(help="print what the round would clean (JSON), doing nothing: no model, no write")
    ] = False,
):
    """One CapFilt round: read → decode → caption → score → select → write, resumable."""
    from capfilt.run.progress import failed_note, input_notes
    from capfilt.run.round import plan_round, run_round

    if dry_run:
        echo_json(plan_round(_config(config, set_), shards, out, captioner, filter_, new_run, human))
        return
    summary = run_round(
        _config(config, set_),
        shards,
        out,
        captioner=captioner,
        filter_=filter_,
        local=local,
        address=address,
        new_run=new_run,
        human=human,
        processes=processes,
    )
    echo_json(summary)
    for note in input_notes(summary):
        typer.echo(f"capfilt: {note}", err=True)
    if summary["failed_shards"]:  # the run went on past them; a scheduler still needs to know
        typer.echo(f"capfilt: {failed_note(summary)}", err=True)
        raise typer.Exit(1)


@app.command()
def actors(
    address: Annotated[str, typer.Option(help="the Ray cluster's address")] = "auto",
    stop: Annotated[bool, typer.Option(help="kill them: their CPUs and GPUs go back to the cluster")] = False,
):
    """The warm actors (run.keep_actors) that a Ray cluster runs, each named by the config, model weights,
    code and library versions it serves."""
    from capfilt.run.ray_pool import warm_actors

    names = warm_actors(address, stop)
    typer.echo("\n".join(names) if names else "no warm capfilt actors")
    if stop and names:
        typer.echo(f"stopped {len(names)}", err=True)


@app.command()
def select(
    run_dir: Annotated[str, typer.Argument(help="a finished round's output folder")],
    out: Annotated[str, typer.Option("--out", "-o", help="where to write the re-selected shards")],
    threshold: Annotated[float, typer.Option(help="ITM match probability to keep a caption")] = 0.5,
    calibration: Annotated[
        str, typer.Option(help="none, or keep / f1: derive the threshold from the run's calibration scores")
    ] = "none",
    keep_share: Annotated[float, typer.Option(help="share of human pairs kept (calibration keep)")] = 0.95,
    new_run: Annotated[bool, typer.Option(help="clear another run or selection in --out first")] = False,
    shards: Annotated[
        list[str] | None,
        typer.Option(help="the run's input shards as signed URLs to read them from (repeatable)"),
    ] = None,
):
    """Re-apply the selection policy to a finished round's stored scores; no model is loaded."""
    from capfilt.run.progress import failed_note
    from capfilt.run.reselect import reselect

    summary = reselect(run_dir, out, threshold, calibration, keep_share, new_run, shards)
    echo_json(summary)
    if summary["failed_shards"]:  # shards the round did not commit: the selection is not the whole run
        typer.echo(f"capfilt: {failed_note(summary)}", err=True)
        raise typer.Exit(1)


@app.command()
def convert(
    src: Annotated[Path, typer.Argument(help="Salesforce BLIP checkpoint, e.g. model_base.pth")],
    out: Annotated[Path, typer.Argument(help="MED folder to write")],
    tokenizer: Annotated[
        str,
        typer.Option(help="folder or HF hub id with BLIP's tokenizer, e.g. Salesforce/blip-itm-base-coco"),
    ],
    config: ConfigOpt = "blip-base",
    set_: SetOpt = None,
):
    """Convert an original BLIP .pth (weights only, never a full unpickle) into a MED folder."""
    from capfilt.model.convert import convert as run_convert

    typer.echo(run_convert(src, out, _config(config, set_).model, tokenizer))


@app.command()
def bootstrap(
    web: Annotated[list[str], typer.Option(help="web shards (repeatable)")],
    human: Annotated[list[str], typer.Option(help="human-annotated shards (repeatable)")],
    test: Annotated[list[str], typer.Option(help="held-out test shards (repeatable)")],
    out: Annotated[
        str,
        typer.Option(
            "--out",
            "-o",
            help="bootstrap folder or URL (s3://..., worked on in a copy under $CAPFILT_SCRATCH), one round-R/ per round",
        ),
    ],
    rounds: Annotated[int, typer.Option(help="cleaning rounds after round 0")] = 2,
    truth: Annotated[str | None, typer.Option("--truth", "--labels", help=LABELS_HELP)] = None,
    warm_start: Annotated[bool, typer.Option(help="start each MED from the previous round's")] = False,
    init: Annotated[
        str | None, typer.Option(help="round 0's MED starts from this MED folder (see `capfilt convert`)")
    ] = None,
    local: Annotated[bool, typer.Option(help="clean in-process instead of on Ray")] = False,
    address: Annotated[str | None, typer.Option(help="Ray cluster address")] = None,
    config: ConfigOpt = "demo",
    set_: SetOpt = None,
):
    """CapFilt rounds: pretrain, finetune, clean, pretrain again...; resumes at the first unfinished step."""
    from capfilt.bootstrap import BootstrapPlan
    from capfilt.bootstrap import bootstrap as run_bootstrap
    from capfilt.report import round_table

    plan = BootstrapPlan(
        web=web,
        human=human,
        test=test,
        rounds=rounds,
        truth=truth,
        warm_start=warm_start,
        init=init,
        local=local,
        address=address,
    )
    typer.echo(round_table(run_bootstrap(_config(config, set_), plan, out)))


@app.command()
def report(
    run_dir: Annotated[Path, typer.Argument(help="a bootstrap folder or a `capfilt run` folder")],
    out: Annotated[Path | None, typer.Option(help="HTML file (default RUN_DIR/report.html)")] = None,
    truth: Annotated[Path | None, typer.Option("--truth", "--labels", help=LABELS_HELP)] = None,
):
    """Write a static HTML report: round table, ITM histograms, example images with their decisions."""
    from capfilt.report import write_report

    typer.echo(write_report(run_dir, out=out, truth=truth))


@app.command()
def demo(
    config: ConfigOpt = "demo",
    set_: SetOpt = None,
    world: Annotated[Path, typer.Option(help="where the demo world is (written if absent)")] = Path("shards"),
    out: Annotated[Path, typer.Option(help="bootstrap folder")] = Path("runs/demo"),
    rounds: Annotated[int, typer.Option(help="cleaning rounds after round 0")] = 1,
):
    """The embedded default: demo world, CapFilt rounds on local Ray, the round table and the report."""
    from capfilt.demo import run_demo

    typer.echo(run_demo(_config(config, set_), world, out, rounds))


@app.command()
def ablation(
    config: ConfigOpt = "ablation",
    set_: SetOpt = None,
    seeds: Annotated[str, typer.Option(help="comma-separated seeds")] = "0,1,2",
    world: Annotated[Path, typer.Option(help="its world (written with the config's synth if absent)")] = Path(
        "runs/ablation/world"
    ),
    out: Annotated[Path, typer.Option(help="folder for every variant's models and evaluations")] = Path(
        "runs/ablation"
    ),
    results: Annotated[Path, typer.Option(help="markdown file whose ablation table is replaced")] = Path(
        "docs/RESULTS.md"
    ),
    parallel: Annotated[
        int, typer.Option(help="seeds side by side, each a process of its own with its share of the cores")
    ] = 1,
    local: Annotated[bool, typer.Option(help="clean in-process instead of on Ray")] = False,
):
    """The paper's CapFilt ablation on the demo world: noisy, +captioner, +filter, both, beam, 2 rounds, oracle."""
    from capfilt.ablation import ensure_world, run_ablation, run_side_by_side, update_results

    cfg, seed_list = _config(config, set_), [int(s) for s in seeds.split(",")]
    if parallel > 1:
        ensure_world(cfg, world)
        args = ["--config", config, *(a for s in set_ or [] for a in ("--set", s)), "--world", str(world)]
        run_side_by_side([*args, "--out", str(out), *["--local"] * local], seed_list, parallel, out)
    table = run_ablation(cfg, world, out, seed_list, local=local)
    update_results(results, table)
    typer.echo(table)


@app.command()
def bench(
    config: ConfigOpt = "demo",
    set_: SetOpt = None,
    world: Annotated[Path, typer.Option(help="the demo world")] = Path("shards"),
    models: Annotated[
        Path | None, typer.Option(help="folder with captioner/ and filter/ for the round")
    ] = Path("runs/demo/round-0/finetune"),
    random_models: Annotated[
        bool, typer.Option(help="round with random models at the config's size")
    ] = False,
    parts: Annotated[
        str, typer.Option(help="comma-separated: decode, train, round, memory")
    ] = "decode,train,round",
    memory_sizes: Annotated[
        str, typer.Option(help="memory: corpus sizes (images) whose peak RSS is compared")
    ] = "10000,100000",
    device: Annotated[str | None, typer.Option(help="cuda or cpu: the GPU path's table instead")] = None,
    batch_sizes: Annotated[str, typer.Option(help="--device: the model batch-size sweep")] = "32,64,128,256",
    images: Annotated[int, typer.Option(help="--device: images per decode and model measurement")] = 1024,
    actors: Annotated[
        str, typer.Option(help="--device: actors (or worker processes) sharing the device, per round")
    ] = "1,2",
    table: Annotated[Path | None, typer.Option(help="--device: also write the markdown table here")] = None,
    address: Annotated[
        str | None,
        typer.Option(help="round: join this Ray cluster (auto: a running one) instead of starting one"),
    ] = None,
    processes: Annotated[bool, typer.Option(help="round: on worker processes, without Ray")] = False,
):
    """Measure decode, training and round throughput (against the batched HF script and the one-image
    loop) on the demo world and print JSON; with --device, the GPU path's table."""

    from capfilt.bench import bench_device, run_bench

    cfg = _config(config, set_)
    if device is None:
        sizes = tuple(int(x) for x in memory_sizes.split(","))
        result = run_bench(cfg, world, models, parts.split(","), random_models, sizes, address, processes)
        echo_json(result)
        for name, value in result.get("round", {}).get("ratios", {}).items():
            typer.echo(f"{name}: {value:.2f}" if value is not None else f"{name}: -")
        return
    ints = [[int(x) for x in s.split(",")] for s in (batch_sizes, actors)]
    result, md = bench_device(cfg, world, device, ints[0], images, ints[1], address, processes)
    echo_json(result)
    typer.echo(md)
    if table is not None:
        table.write_text(md + "\n")


if __name__ == "__main__":  # pragma: no cover
    app()
