"""A real two-node Ray cluster on this machine: a round submitted with ``ray job submit`` grows its pool
onto a worker node that joins mid-run, loses that node mid-run, and still finishes on the head with the
bytes of a single-node run and every sample accounted for.

Run it alone with ``pytest -m cluster``; docs/USER_GUIDE.md shows the same steps by hand.
"""

from __future__ import annotations

import json
import shutil
import signal
import sys
import tempfile
import time

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
    """The nodes where ``name`` (``ShardActor.run`` or an actor class) finished or lives."""
    roles = _roles(api)
    if name == "ShardActor":
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

    port, dash = free_port(), free_port()
    api = f"http://127.0.0.1:{dash}"
    temp = tempfile.mkdtemp(prefix="cfray", dir="/tmp")  # Unix socket paths must stay short
    hooks = tmp_path / "hooks"
    hooks.mkdir()
    hold = hooks / "web-000000.hold"  # the head's actor keeps shard 0 in flight until released
    hold.write_text("")
    head = ray_node(
        "--head",
        f"--port={port}",
        "--num-cpus=1",
        '--resources={"head": 1}',
        "--include-dashboard=true",
        f"--dashboard-port={dash}",
        f"--temp-dir={temp}",
    )
    worker = None
    out = tmp_path / "cluster"
    job_id = f"capfilt-two-nodes-{port}"
    try:
        wait_for_dashboard(dash, head)
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
        worker = ray_node(f"--address=127.0.0.1:{port}", "--num-cpus=1", '--resources={"worker": 1}')
        _wait("a shard committed by the worker node", lambda: list(out.glob("*.done")))
        stop_node(worker, signal.SIGKILL)  # the node is lost mid-run, most likely with a shard in flight
        assert len(list(out.glob("*.done"))) < N_SHARDS
        hold.unlink()

        client = JobSubmissionClient(api)
        _wait("the job", lambda: client.get_job_status(job_id).is_terminal(), timeout=300)
        assert client.get_job_status(job_id) == JobStatus.SUCCEEDED, client.get_job_logs(job_id)[-3000:]
        ran_on = _ran_on(api, "ShardActor.run")
    finally:
        if worker is not None:
            stop_node(worker, signal.SIGKILL)
        stop_node(head)
        shutil.rmtree(temp, ignore_errors=True)

    assert "head" in ran_on and "worker" in ran_on, ran_on
    summary = json.loads((out / "summary.json").read_text())
    assert summary["shards_done"] == N_SHARDS and not summary["failed_shards"]
    assert summary["n_in"] == N_SHARDS * PER_SHARD
    assert summary["n_in"] == summary["kept"] + summary["dropped"] + sum(summary["rejected"].values())
    assert outputs(out) == outputs(reference)
