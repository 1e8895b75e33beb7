"""Scheduled jobs: the KubeRay RayJob manifest is well-formed, and its entrypoint, run as written (its
s3:// inputs and outputs on a moto server, the tiny models instead of the mounted ones), cleans a night's
shards and, the next night, only the newly downloaded ones."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from run_helpers import make_shards

from capfilt.config import load_config

pytest_plugins = ["run_helpers"]  # tiny_models

ROOT = Path(__file__).resolve().parent.parent
# What differs between a GPU node and this test: no GPU, no DALI, the tiny models' input size.
TINY = ["run.num_gpus_per_actor=0", "run.num_cpus_per_actor=1", "run.decoder=pillow", "run.image_size=32"]


def manifest() -> dict:
    return yaml.safe_load((ROOT / "pipelines" / "rayjob.yaml").read_text())


def test_rayjob_manifest_is_a_scheduled_rayjob_over_s3():
    job = manifest()
    assert (job["apiVersion"], job["kind"]) == ("ray.io/v1", "RayJob")
    spec = job["spec"]
    assert spec["schedule"] and spec["shutdownAfterJobFinishes"] is True
    cluster = spec["rayClusterSpec"]
    assert cluster["headGroupSpec"]["template"]["spec"]["containers"]
    assert all(g["template"]["spec"]["containers"] for g in cluster["workerGroupSpecs"])
    argv = shlex.split(spec["entrypoint"])
    assert argv[:2] == ["python", "pipelines/run_round.py"]
    assert argv[2].startswith("s3://") and argv[argv.index("--out") + 1].startswith("s3://")
    assert load_config(argv[argv.index("--config") + 1]).run.actors == "auto"


def _upload(s3, local: list[str], prefix: str) -> None:
    for path in local:
        s3.put(path, f"{prefix}/{Path(path).name}")


def test_rayjob_entrypoint_cleans_only_new_shards_each_night(s3, tiny_models, tmp_path):
    argv = shlex.split(manifest()["spec"]["entrypoint"])
    shards_url, out = argv[2], argv[argv.index("--out") + 1]
    bucket, web = shards_url[len("s3://") :].split("/")[0], shards_url.rsplit("/", 1)[0]
    s3.mkdir(bucket)
    argv[0] = sys.executable
    argv[argv.index("--captioner") + 1], argv[argv.index("--filter") + 1] = tiny_models
    argv += [a for kv in TINY for a in ("--set", kv)]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # a local Ray stands in for the cluster
    local = make_shards(tmp_path, n_shards=3, per_shard=4)

    summaries = []
    for night, new in enumerate((local[:2], local[2:])):
        _upload(s3, new, web)
        plan = subprocess.run([*argv, "--dry-run"], cwd=ROOT, env=env, capture_output=True, text=True)
        assert len(json.loads(plan.stdout)["to_clean"]) == len(new), plan.stderr[-3000:]
        done = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=400)
        assert done.returncode == 0, done.stderr[-3000:]
        summaries.append(json.loads(s3.cat(f"{out}/summary.json")))
        assert summaries[-1]["this_invocation"]["shards"] == len(new), f"night {night}"
    assert summaries[1]["shards_done"] == 3 and summaries[1]["shards_already_done"] == 2
    assert summaries[1]["n_in"] == 12 and not summaries[1]["failed_shards"]
    info = json.loads(s3.cat(f"{out}/dataset_info.json"))
    assert info["counts"]["in"] == 12 and info["counts"]["shards_processed_this_time"] == 1
    assert (
        len(info["files"]["webdataset"]) == 3 and "# A CapFilt-cleaned" in s3.cat(f"{out}/README.md").decode()
    )


@pytest.mark.parametrize(
    "command, script, where",
    [
        ("bootstrap", "bootstrap.py", {"--local", "--address"}),
        ("run", "run_round.py", {"--local", "--address", "--processes"}),
    ],
)
def test_a_cluster_job_takes_every_option_of_its_command(command, script, where):
    """The cluster jobs run `capfilt bootstrap`'s rounds and `capfilt run`'s round: all their options but
    where they run are the job's (run_round.py once lacked --human, so a calibrated round could not run)."""
    import typer.main

    from capfilt.cli import app

    params = typer.main.get_command(app).commands[command].params
    options = {o for p in params for o in p.opts if o.startswith("--")} - where
    job = [sys.executable, str(ROOT / "pipelines" / script), "--help"]
    usage = subprocess.run(job, capture_output=True, text=True, check=True).stdout
    assert "--set" in options and options <= set(re.findall(r"--[a-z-]+", usage))
