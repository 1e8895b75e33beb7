"""A real two-node Ray cluster on this machine, and a worker node lost mid-job: a round submitted with
``ray job submit`` grows its pool onto a worker node that joins mid-run, loses that node mid-run, and
still finishes on the head with the bytes of a single-node run and every sample accounted for; a
bootstrap's data-parallel pretraining loses its worker node after a checkpoint and resumes from it on
the head.

Run it alone with ``pytest -m cluster``; docs/USER_GUIDE.md shows the same steps by hand.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import ray
from ray.job_submission import JobStatus, JobSubmissionClient
from ray.util.state import list_actors, list_nodes, list_tasks
from run_helpers import (
    RAY_BIN,
    free_port,
    make_shards,
    outputs,
    ray_node,
    stop_node,
    submit_job,
    tiny_cfg,
    wait_for_dashboard,
)

from capfilt.run.faults import KILL_DIR
from capfilt.run.round import run_round
from capfilt.train.checkpoint import latest_checkpoint

pytest_plugins = ["run_helpers"]  # tiny_models

pytestmark = [pytest.mark.cluster, pytest.mark.slow]

N_SHARDS, PER_SHARD = 10, 8


def _roles(api: str) -> dict[str, str]:
    """Node id → ``head`` or ``worker``, from the custom resource each node was started with."""
    return {
        n.node_id: next((r for r in ("head", "worker") if r in n.resources_total), "?")
        for n in list_nodes(address=api, raise_on_missing_output=False)
    }


def _ran_on(api: str, name: str) -> list[str]:
    """The nodes where ``name`` (a task such as ``ShardActor.run``, or an actor class) finished or lived."""
    roles = _roles(api)
    if "." not in name:
        found = list_actors(address=api, filters=[("class_name", "=", name)], raise_on_missing_output=False)
    else:
        filters = [("name", "=", name), ("state", "=", "FINISHED")]
        found = list_tasks(address=api, filters=filters, limit=1000, raise_on_missing_output=False)
    return sorted(roles.get(x.node_id, "?") for x in found)


def _wait(what: str, ready, timeout: float = 180) -> None:
    deadline = time.time() + timeout
    while not ready():
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


def _node(role: str, temp: str, *args: str, cpus: int = 1) -> subprocess.Popen:
    """A node of ``cpus`` CPUs marked by the custom resource ``role``, in its own temp folder: without one
    a worker node takes the head's, and on one machine its runtime-env agent then unpacks a job's
    working_dir again over the head's, under the running driver."""
    return ray_node(f"--num-cpus={cpus}", f'--resources={{"{role}": 1}}', f"--temp-dir={temp}", *args)


def _temp() -> str:
    return tempfile.mkdtemp(prefix="cfray", dir="/tmp")  # Unix socket paths must stay short


@dataclass
class Cluster:
    api: str  # the dashboard's address
    port: int  # the head's GCS port
    join: Callable[[], subprocess.Popen]  # starts the worker node


@contextlib.contextmanager
def _cluster(head_cpus: int = 1):
    """A head node of ``head_cpus`` CPUs marked by the custom resource ``head``; ``join`` adds a worker
    node of one CPU marked ``worker``. Both end when the block does."""
    port, dash = free_port(), free_port()
    temps = [_temp(), _temp()]
    nodes = [
        _node(
            "head",
            temps[0],
            "--head",
            f"--port={port}",
            "--include-dashboard=true",
            f"--dashboard-port={dash}",
            cpus=head_cpus,
        )
    ]

    def join() -> subprocess.Popen:
        nodes.append(_node("worker", temps[1], f"--address=127.0.0.1:{port}"))
        return nodes[-1]

    try:
        wait_for_dashboard(dash, nodes[0])
        yield Cluster(f"http://127.0.0.1:{dash}", port, join)
    finally:
        for node in nodes[1:]:
            stop_node(node)
        stop_node(nodes[0])
        for temp in temps:
            shutil.rmtree(temp, ignore_errors=True)


def test_bootstrap_job_trains_on_both_nodes_and_finishes_on_the_head(tiny_world, tmp_path):
    """`pipelines/bootstrap.py` submitted to two nodes: round 0's pretraining runs two Ray Train workers,
    spread one per node (``pretrain.placement=SPREAD``). The worker node is lost right after the first
    pretraining checkpoint; Ray Train starts both workers again on the head (two CPUs), they resume from
    that checkpoint, and the round finishes with every step's marker. (The finetuning runs in the driver:
    Ray Train starts take half a minute each here. The cleaning rounds after it run the code of
    test_bootstrap.py's rounds, on a cluster as test_two_nodes_grow_lose_a_node_and_give_single_node_bytes
    runs a round.)"""
    out = tmp_path / "boot"
    hooks = tmp_path / "hooks"
    hooks.mkdir()
    hold = hooks / "pretrain.step-4.hold"  # rank 0 waits after writing step-4 (of 6) until released
    hold.write_text("")
    with _cluster(head_cpus=2) as cluster:
        api = cluster.api
        worker = cluster.join()
        _wait("the worker node", lambda: sorted(_roles(api).values()) == ["head", "worker"])
        job_id = f"capfilt-bootstrap-{cluster.port}"
        argv = [RAY_BIN, "job", "submit", "--address", api, "--no-wait", f"--submission-id={job_id}"]
        argv += ["--working-dir", ".", "--runtime-env-json", json.dumps({"env_vars": {KILL_DIR: str(hooks)}})]
        argv += ["--", sys.executable, "pipelines/bootstrap.py", "--config", "tiny"]
        argv += ["--web", f"{tiny_world}/web-*.tar", "--human", f"{tiny_world}/human-*.tar"]
        argv += ["--test", f"{tiny_world}/test-*.tar", "--out", str(out), "--rounds", "0"]
        argv += ["--set", "pretrain.workers=2", "--set", "pretrain.placement=SPREAD"]
        submitted = submit_job(argv)
        assert submitted.returncode == 0, submitted.stdout[-2000:] + submitted.stderr[-2000:]
        client = JobSubmissionClient(api)
        pretraining = out / "round-0" / "pretrain"
        _wait("round 0's first checkpoint", lambda: latest_checkpoint(pretraining) is not None, timeout=600)
        before = _ran_on(api, "RayTrainWorker")
        stop_node(worker)  # the node is lost mid-training
        hold.unlink()
        _wait("the job", lambda: client.get_job_status(job_id).is_terminal(), timeout=900)
        logs = client.get_job_logs(job_id)
        assert client.get_job_status(job_id) == JobStatus.SUCCEEDED, logs[-3000:]
        trained_on = _ran_on(api, "RayTrainWorker")

    assert before == ["head", "worker"], before
    assert trained_on.count("worker") == 1 and len(trained_on) >= 4, trained_on  # both again on the head
    assert latest_checkpoint(pretraining).name == "step-6"
    assert "[pretrain] resuming from step-4" in logs  # not from the start
    steps = ["pretrain", "finetune", "eval"]
    assert [s for s in steps if (out / "round-0" / f"{s}.done").exists()] == steps


def test_two_nodes_grow_lose_a_node_and_give_single_node_bytes(tiny_models, tmp_path):
    shards = make_shards(tmp_path / "in", n_shards=N_SHARDS, per_shard=PER_SHARD)
    reference = tmp_path / "single-node"
    if ray.is_initialized():
        ray.shutdown()
    ray.init(num_cpus=1, include_dashboard=False)
    try:
        run_round(tiny_cfg("run.actors=auto"), shards, str(reference), *tiny_models, progress=False)
    finally:
        ray.shutdown()

    hooks = tmp_path / "hooks"
    hooks.mkdir()
    hold = hooks / "web-000000.hold"  # the head's actor keeps shard 0 in flight until released
    hold.write_text("")
    out = tmp_path / "cluster"
    with _cluster() as cluster:
        api = cluster.api
        job_id = f"capfilt-two-nodes-{cluster.port}"
        submitted = submit_job(
            [
                RAY_BIN,
                "job",
                "submit",
                "--address",
                api,
                "--no-wait",
                f"--submission-id={job_id}",
                "--working-dir",
                ".",
                "--runtime-env-json",
                json.dumps({"env_vars": {KILL_DIR: str(hooks)}}),
                "--",
                sys.executable,
                "pipelines/run_round.py",
                *shards,
                "--out",
                str(out),
                "--captioner",
                tiny_models[0],
                "--filter",
                tiny_models[1],
                "--config",
                "tiny",
                "--set",
                "run.actors=auto",
                "--set",
                "caption.num_captions=2",
            ]
        )
        assert submitted.returncode == 0, submitted.stdout[-2000:] + submitted.stderr[-2000:]

        # The pool starts with the one actor the head's CPU holds; a worker node joins mid-run and the
        # pool must grow onto it: with the head's actor held, every shard committed now is the worker's.
        _wait("the head's actor", lambda: _ran_on(api, "ShardActor") == ["head"])
        worker = cluster.join()
        _wait("a shard committed by the worker node", lambda: list(out.glob("*.done")))
        stop_node(worker)  # the node is lost mid-run, most likely with a shard in flight
        assert len(list(out.glob("*.done"))) < N_SHARDS
        hold.unlink()

        client = JobSubmissionClient(api)
        _wait("the job", lambda: client.get_job_status(job_id).is_terminal(), timeout=300)
        assert client.get_job_status(job_id) == JobStatus.SUCCEEDED, client.get_job_logs(job_id)[-3000:]
        ran_on = _ran_on(api, "ShardActor.run")

    assert "head" in ran_on and "worker" in ran_on, ran_on
    summary = json.loads((out / "summary.json").read_text())
    assert summary["shards_done"] == N_SHARDS and not summary["failed_shards"]
    assert summary["n_in"] == N_SHARDS * PER_SHARD
    assert summary["n_in"] == summary["kept"] + summary["dropped"] + sum(summary["rejected"].values())
    assert outputs(out) == outputs(reference)
