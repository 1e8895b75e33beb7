"""Cluster job: one CapFilt round, submitted with

    ray job submit --address http://HEAD:8265 --working-dir . -- \\
        python pipelines/run_round.py 's3://b/web-{000000..000999}.tar' --out s3://b/round-1 \\
        --captioner /models/captioner --filter /models/filter --config blip-base

Under ``ray job submit`` it joins the cluster (``address="auto"``); run by hand it starts a local Ray.
"""

from __future__ import annotations

import argparse
import os
import sys

from capfilt import jsonio
from capfilt.config import load_config
from capfilt.run.progress import failed_note, input_notes
from capfilt.run.round import plan_round, run_round
from capfilt.signals import exit_on_sigterm


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("shards", nargs="+", help="web shard specs (fsspec URLs, brace patterns, globs, lists)")
    p.add_argument("--out", required=True, help="run folder or fsspec URL")
    p.add_argument("--captioner", required=True, help="captioner folder, or HF hub id org/name[@rev]")
    p.add_argument("--filter", required=True, help="filter folder, or HF hub id org/name[@rev]")
    p.add_argument("--config", default="demo", help="config name in configs/ or a YAML path")
    p.add_argument("--set", action="append", default=[], help="override: section.key=value (repeatable)")
    p.add_argument("--new-run", action="store_true", help="clear a run made with another config/models")
    p.add_argument("--human", action="append", help="human shards to calibrate the threshold (repeatable)")
    p.add_argument("--dry-run", action="store_true", help="print what the round would clean, doing nothing")
    args = p.parse_args(argv)
    cfg = load_config(args.config, args.set)
    if args.dry_run:
        plan = plan_round(cfg, args.shards, args.out, args.captioner, args.filter, args.new_run, args.human)
        print(jsonio.dumps(plan, indent=1))
        return plan
    address = "auto" if os.environ.get("RAY_JOB_ID") or os.environ.get("RAY_ADDRESS") else None
    summary = run_round(
        cfg,
        args.shards,
        args.out,
        captioner=args.captioner,
        filter_=args.filter,
        address=address,
        new_run=args.new_run,
        progress=False,
        human=args.human,
    )
    print(jsonio.dumps(summary, indent=1))
    return summary


if __name__ == "__main__":
    exit_on_sigterm()  # `ray job stop` sends SIGTERM: the round closes its pool and gives its lease back
    summary = main()
    for note in input_notes(summary):  # the job's log says what the summary alone would leave unsaid
        print(f"run_round: {note}", file=sys.stderr)
    if summary.get("failed_shards"):  # `ray job submit` then reports the job FAILED; a rerun retries them
        sys.exit(f"run_round: {failed_note(summary)}")
