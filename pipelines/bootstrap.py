"""Cluster job: CapFilt bootstrap rounds, submitted with `ray job submit`.

    ray job submit --address http://HEAD:8265 --working-dir . -- \
        python pipelines/bootstrap.py --config configs/cluster-example.yaml --out /mnt/shared/boot \
        --web 's3://bucket/web-{000000..000999}.tar' --human 's3://bucket/coco-{000..009}.tar' \
        --test 's3://bucket/test-000.tar' --rounds 2

Thin on purpose: it joins the cluster it was submitted to and calls the library, so the job does exactly
what `capfilt bootstrap` does on a laptop. Round 0 starts from DeiT-base and bert-base-uncased, as the
reference does (blip-base's `model.vision_init`/`text_init`): the driver reads them from its HF cache
(`hf download` them once there) and writes the initial MED into the output folder, which the training
workers load.
"""

from __future__ import annotations

import argparse

from capfilt.signals import exit_on_sigterm


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="demo")
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    ap.add_argument("--web", action="append", required=True)
    ap.add_argument("--human", action="append", required=True)
    ap.add_argument("--test", action="append", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--truth", "--labels", help="truth.parquet or a labels file, for evaluation only")
    ap.add_argument("--warm-start", action="store_true")
    ap.add_argument("--init", help="round 0's MED starts from this MED folder (see `capfilt convert`)")
    args = ap.parse_args()
    # after the arguments: `--help` and a wrong option answer at once, not after torch's import
    from capfilt.bootstrap import BootstrapPlan, bootstrap
    from capfilt.config import load_config
    from capfilt.report import round_table
    from capfilt.run.ray_pool import connect_ray

    connect_ray("auto")  # the cluster this job was submitted to; `ray job stop` then exits 143, cleanly
    plan = BootstrapPlan(
        web=args.web,
        human=args.human,
        test=args.test,
        rounds=args.rounds,
        truth=args.truth,
        warm_start=args.warm_start,
        init=args.init,
        address="auto",
    )
    print(round_table(bootstrap(load_config(args.config, args.overrides), plan, args.out)))


if __name__ == "__main__":
    exit_on_sigterm()  # `ray job stop` sends SIGTERM: the step's lease is given back (capfilt/signals.py)
    main()
