"""`make demo`: the embedded default, end to end on one machine.

Writes the demo world into ``shards/`` (once), bootstraps CapFilt rounds on local Ray, prints the round
table and writes the HTML report. Everything it runs is the same code a cluster job runs.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from capfilt.bootstrap import BootstrapPlan, bootstrap
from capfilt.config import Config
from capfilt.report import round_table, write_report


def world_plan(world: Path, rounds: int, local: bool = False) -> BootstrapPlan:
    """The bootstrap inputs of a demo world folder made by `capfilt synth`; ``local`` cleans in-process."""
    return BootstrapPlan(
        web=[str(world / "web-*.tar")],
        human=[str(world / "human-*.tar")],
        test=[str(world / "test-*.tar")],
        rounds=rounds,
        truth=str(world / "truth.parquet"),
        local=local,
    )


def run_demo(cfg: Config, world: Path, out: Path, rounds: int, log: Callable[[str], None] = print) -> str:
    """Synthesize the world if absent, bootstrap `rounds` cleaning rounds, return the table and report path."""
    from capfilt.data.synth import write_world

    world, out = Path(world), Path(out)
    if not (world / "truth.parquet").is_file():
        log(f"writing the demo world into {world}/ ...")
        log(str(write_world(str(world), cfg.synth)))
    table = round_table(bootstrap(cfg, world_plan(world, rounds), out, log=log))
    report = write_report(out)
    return f"{table}\n\nreport: {report}"
