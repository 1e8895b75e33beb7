"""The round on a real local Ray and on worker processes without Ray (``--processes``): workers
SIGKILLed mid-shard, a driver SIGKILLed mid-run, ray job submit.

Every recovered run must write the same bytes as an uninterrupted one on Ray (stats.json differs only in
its timings, which are measured): both pools run the same worker with one thread each.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import ray
from run_helpers import (
    RAY_ENV,
    free_port,
    make_shards,
    outputs,
    ray_node,
    stop_node,
    submit_job,
    tiny_cfg,
    wait_for_dashboard,
)
from typer.testing import CliRunner

from capfilt.cli import app
from capfilt.config import ConfigError, load_config
from capfilt.data.writer import is_temp
from capfilt.errors import UserError
from capfilt.run import lease
from capfilt.run.dispatch import actors_that_fit
from capfilt.run.faults import KILL_DIR
from capfilt.run.process_pool import worker_env
from capfilt.run.ray_pool import NAMESPACE, RayPool, warm_actors, warm_prefix
from capfilt.run.round import run_round
from capfilt.run.worker import ShardWorker

pytest_plugins = ["run_helpers"]  # tiny_models, tiny_shards

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return make_shards(tmp_path_factory.mktemp("ray-shards"), n_shards=4, per_shard=10)


@pytest.fixture(scope="module")
def kill_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("kills")


@pytest.fixture(scope="module")
def local_ray(kill_dir):
    with pytest.MonkeyPatch.context() as env:
        env.setenv(KILL_DIR, str(kill_dir))  # the worker processes of --processes inherit it
        ray.init(num_cpus=2, include_dashboard=False, runtime_env={"env_vars": {KILL_DIR: str(kill_dir)}})
        yield
        ray.shutdown()


@pytest.fixture(params=["ray", "processes"])
def pool(request, local_ray) -> dict:
    """run_round's options for each pool: a local Ray's actors, or worker processes without Ray."""
    return {"processes": request.param == "processes"}


@pytest.fixture(scope="module")
def reference(local_ray, tiny_models, shards, tmp_path_factory):
    out = tmp_path_factory.mktemp("reference") / "run"
    summary = run_round(tiny_cfg(), shards, str(out), *tiny_models, progress=False)
    assert summary["shards_done"] == 4 and not summary["failed_shards"]
    this = summary["this_invocation"]  # the fixed costs, each actor's build (imports, models) apart
    assert len(this["startup_seconds"]["workers"]) == 2 and min(this["startup_seconds"]["workers"]) > 0
    assert 0 <= this["startup_seconds"]["ray"] < this["seconds"] and this["close_seconds"] >= 0
    return out


def test_actors_killed_mid_shard_give_identical_outputs(
    reference, pool, tiny_models, shards, kill_dir, tmp_path
):
    (kill_dir / "web-000001.kill").write_text("2")  # the same shard dies twice, on whichever actor runs it
    (kill_dir / "web-000003.kill").write_text("1")
    summary = run_round(tiny_cfg(), shards, str(tmp_path / "run"), *tiny_models, progress=False, **pool)
    assert all((kill_dir / f).read_text() == "0" for f in ("web-000001.kill", "web-000003.kill"))
    assert summary["shards_done"] == 4 and not summary["failed_shards"]
    built = summary["this_invocation"]["startup_seconds"]["workers"]  # the restarted ones' latest builds
    assert 1 <= len(built) <= 2  # (one restarted after the last kill and not built yet is left out)
    assert summary["n_in"] == summary["kept"] + summary["dropped"] + sum(summary["rejected"].values())
    assert outputs(tmp_path / "run") == outputs(reference)
    assert not [p.name for p in (tmp_path / "run").iterdir() if is_temp(p.name)]  # the killed tars' temps


def test_two_shards_in_flight_survive_a_kill_with_identical_outputs(
    reference, pool, tiny_models, shards, kill_dir, tmp_path
):
    """One actor with two shards in flight, SIGKILLed in one of them: both are retried, nothing changes."""
    (kill_dir / "web-000002.kill").write_text("1")
    cfg = tiny_cfg("run.actors=1", "run.shards_in_flight=2")
    summary = run_round(cfg, shards, str(tmp_path / "run"), *tiny_models, progress=False, **pool)
    assert (kill_dir / "web-000002.kill").read_text() == "0"
    assert summary["shards_done"] == 4 and not summary["failed_shards"]
    assert outputs(tmp_path / "run") == outputs(reference)


def test_auto_pool_fits_the_declared_resources():
    run = load_config(
        "tiny", ["run.actors=auto", "run.num_gpus_per_actor=0.5", "run.num_cpus_per_actor=4"]
    ).run
    assert actors_that_fit(run, {"CPU": 64.0, "GPU": 8.0}) == 16  # two actors per GPU
    assert actors_that_fit(run, {"CPU": 10.0, "GPU": 8.0}) == 2  # CPUs run out first
    assert actors_that_fit(run, {"CPU": 64.0}) == 0  # no GPU node yet (an autoscaler adds one)
    assert actors_that_fit(load_config("tiny", ["run.num_cpus_per_actor=0.3"]).run, {"CPU": 3.0}) == 10
    with pytest.raises(ConfigError, match="auto"):
        load_config("tiny", ["run.actors=many"])


def test_worker_processes_get_their_threads_and_share_of_the_gpus():
    """``--processes`` sets what Ray sets for an actor: threads from its CPUs, GPUs handed out in order."""

    def env(*sets: str, index: int = 0, visible: str | None = None) -> dict[str, str]:
        return worker_env(load_config("tiny", list(sets)).run, index, visible)

    assert env() == {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}  # no GPU
    half = ["run.num_gpus_per_actor=0.5", "run.num_cpus_per_actor=4"]
    assert [env(*half, index=i)["CUDA_VISIBLE_DEVICES"] for i in range(4)] == ["0", "0", "1", "1"]
    assert env(*half, index=3, visible="4,6")["CUDA_VISIBLE_DEVICES"] == "6"  # the driver's own GPUs
    assert env(*half)["OMP_NUM_THREADS"] == "4"
    assert env("run.num_gpus_per_actor=2", index=1)["CUDA_VISIBLE_DEVICES"] == "2,3"
    with pytest.raises(UserError, match="lower run.actors"):
        env(*half, index=4, visible="4,6")


def children(pid: int) -> list[int]:
    """The live processes whose parent is ``pid`` (from /proc)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()  # after "(comm)": state, ppid, ...
        except (OSError, IndexError):
            continue
        if int(fields[1]) == pid and fields[0] != "Z":
            found.append(int(stat.parent.name))
    return found


@pytest.mark.parametrize("interrupt", ["SIGKILL to the driver", "Ctrl-C", "SIGTERM to the driver"])
def test_worker_processes_exit_with_a_killed_driver(interrupt, tiny_models, shards, tmp_path):
    """A ``--processes`` driver SIGKILLed mid-run leaves no worker behind (each sees its pipe close); on
    Ctrl-C (SIGINT to the whole process group) the workers leave it to the driver, which stops them
    without a traceback from each. SIGTERM (a scheduler's stop) runs the same cleanup: exit 143 and the
    lease given back, so a rerun on another host is not refused as busy (before, Python's default ended
    the driver at once and left the lease). Either way a rerun finishes the round."""
    out, (cap, flt) = tmp_path / "run", tiny_models
    argv = [sys.executable, "-m", "capfilt.cli", "run", *shards, "--out", str(out), "--captioner", cap]
    argv += ["--filter", flt, "-c", "tiny", "--set", "run.actors=2", "--processes"]
    proc = subprocess.Popen(
        argv,
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # its own process group, as a terminal's foreground job
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),  # a test runner may ignore it
    )
    try:
        deadline = time.time() + 120
        while not list(out.glob("*.done")) and proc.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        workers = children(proc.pid)
        if interrupt == "Ctrl-C":
            os.killpg(proc.pid, signal.SIGINT)
        else:
            proc.send_signal(signal.SIGKILL if interrupt.startswith("SIGKILL") else signal.SIGTERM)
        stderr = proc.communicate(timeout=60)[1]
    finally:
        proc.kill()
        proc.wait()
    assert len(workers) >= 2  # the two workers (and multiprocessing's resource tracker, if it runs)
    if interrupt != "SIGKILL to the driver":
        assert proc.returncode == (130 if interrupt == "Ctrl-C" else 143), stderr[-2000:]
        assert "Traceback" not in stderr and not (out / "lease.json").exists(), stderr[-2000:]
    deadline = time.time() + 30
    while any(Path(f"/proc/{pid}").exists() for pid in workers) and time.time() < deadline:
        time.sleep(0.1)
    assert not [pid for pid in workers if Path(f"/proc/{pid}").exists()]
    result = CliRunner().invoke(app, argv[3:])
    assert result.exit_code == 0, result.output
    assert json.loads((out / "summary.json").read_text())["shards_done"] == 4


def test_auto_pool_gives_the_same_outputs(reference, pool, tiny_models, shards, tmp_path):
    """ "auto": as many actors as the local Ray's 2 CPUs hold, or worker processes as this machine's CPUs."""
    summary = run_round(
        tiny_cfg("run.actors=auto"), shards, str(tmp_path / "run"), *tiny_models, progress=False, **pool
    )
    assert summary["shards_done"] == 4 and not summary["failed_shards"]
    cpus = 2 if not pool["processes"] else min(4, len(os.sched_getaffinity(0)))
    assert len(summary["this_invocation"]["startup_seconds"]["workers"]) == cpus
    assert outputs(tmp_path / "run") == outputs(reference)


def test_warm_actors_serve_the_next_run_and_give_the_same_outputs(
    reference, tiny_models, shards, tmp_path, capsys
):
    """With run.keep_actors the round's actors outlive it, named and detached, and the next run with the
    same config and models takes them (the same processes) instead of building new ones: no imports or
    model loading at its start, and the same bytes. A round that finds them holding the cluster's CPUs says
    so. `capfilt actors --stop` frees them."""
    cfg = tiny_cfg("run.keep_actors=true")
    try:
        first = run_round(cfg, shards, str(tmp_path / "a"), *tiny_models, progress=False, address="auto")
        names = warm_actors("auto")
        pids = {n: ray.get(ray.get_actor(n, namespace=NAMESPACE).pid.remote()) for n in names}
        second = run_round(cfg, shards, str(tmp_path / "b"), *tiny_models, progress=False, address="auto")
        assert warm_actors("auto") == names and len(names) == 2
        assert {n: ray.get(ray.get_actor(n, namespace=NAMESPACE).pid.remote()) for n in names} == pids
        capsys.readouterr()
        cold = RayPool(tiny_cfg(), *tiny_models, n_shards=1, address="auto")
        cold._ensure(1)  # its actor waits for the CPUs the warm ones hold: said, not a silent wait
        cold.close()
        assert "2 warm actor(s) of other runs" in capsys.readouterr().err
    finally:
        result = CliRunner().invoke(app, ["actors", "--address", "auto", "--stop"])
    assert result.exit_code == 0 and result.stdout.split() == names
    assert warm_actors("auto") == []
    built = [run["this_invocation"]["startup_seconds"] for run in (first, second)]
    assert (
        [b["warm"] for b in built] == [0, 2] and len(built[0]["workers"]) == 2 and built[1]["workers"] == []
    )
    assert outputs(tmp_path / "a") == outputs(tmp_path / "b") == outputs(reference)


def test_warm_actors_are_named_by_config_models_and_code_and_need_a_cluster(tiny_models, shards, tmp_path):
    cfg, hashes = tiny_cfg("run.keep_actors=true"), {"captioner": "c1", "filter": "f1"}
    other_cfg, other_models = tiny_cfg("run.keep_actors=true", "run.seed=1"), hashes | {"filter": "f2"}
    names = {warm_prefix(cfg, hashes), warm_prefix(other_cfg, hashes), warm_prefix(cfg, other_models)}
    assert len(names) == 3 and warm_prefix(cfg, dict(hashes)) in names
    for where in ({}, {"processes": True}, {"local": True}):
        with pytest.raises(UserError, match="keep_actors .* --address"):
            run_round(cfg, shards, str(tmp_path / "run"), *tiny_models, progress=False, **where)


def test_a_shard_that_keeps_failing_is_reported_not_fatal(pool, tiny_models, shards, kill_dir, tmp_path):
    (kill_dir / "web-000002.kill").write_text("99")
    summary = run_round(
        tiny_cfg("run.max_shard_retries=1"),
        shards,
        str(tmp_path / "run"),
        *tiny_models,
        progress=False,
        **pool,
    )
    (kill_dir / "web-000002.kill").write_text("0")
    assert list(summary["failed_shards"]) == [shards[2]] and summary["shards_done"] == 3
    assert not (tmp_path / "run" / "web-000002.done").exists()


def test_a_round_whose_lease_was_taken_over_starts_no_shard(pool, tiny_models, shards, monkeypatch, tmp_path):
    """The pool checks the lease before each shard it hands out (here it is lost before the first)."""
    enter = lease.Lease.__enter__

    def lost_at_once(self):
        enter(self)
        self.lost.set()  # as the renewal thread sets it (tests/test_lease.py)
        return self

    monkeypatch.setattr(lease.Lease, "__enter__", lost_at_once)
    with pytest.raises(lease.LeaseLost, match="stopped after 0 shard"):
        run_round(tiny_cfg(), shards, str(tmp_path / "run"), *tiny_models, progress=False, **pool)
    assert not list((tmp_path / "run").glob("*.done"))


def test_a_commit_that_finds_the_lease_taken_over_stops_the_round_at_once(
    pool, tiny_models, shards, monkeypatch, tmp_path
):
    """The worker's own reading of the lease, before the driver's renewal notices (up to RENEW_S later):
    its LeaseLost ends the round at once instead of being retried like a failed shard, and no summary is
    written into the folder another job now holds."""
    enter, other = (
        lease.Lease.__enter__,
        {"owner": "y", "host": "another-node", "pid": 1, "renewed": time.time()},
    )

    def taken_over_at_once(self):
        enter(self)
        Path(self.url).write_text(json.dumps(other))
        return self

    monkeypatch.setattr(lease.Lease, "__enter__", taken_over_at_once)
    out = tmp_path / "run"
    with pytest.raises(lease.LeaseLost, match="another-node"):
        run_round(tiny_cfg(), shards, str(out), *tiny_models, progress=False, **pool)
    assert not list(out.glob("*.done")) and not (out / "summary.json").exists()
    assert json.loads((out / "lease.json").read_text()) == other


def test_actors_that_cannot_be_built_fail_the_run_with_their_reason(pool, tiny_models, shards, tmp_path):
    """Each shard fails with the actors' own error, and the command exits 1 after its summary."""
    cap, flt = tiny_models
    args = ["run", *shards, "--out", str(tmp_path / "run"), "--captioner", flt, "--filter", cap, "-c", "tiny"]
    result = CliRunner().invoke(app, args + ["--processes"] * pool["processes"])
    assert result.exit_code == 1, result.output
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["shards_done"] == 0 and len(summary["failed_shards"]) == 4
    assert all("not a BlipCaptioner" in error for error in summary["failed_shards"].values())
    assert "capfilt: 4 of 4 shards failed" in result.stderr and "not a BlipCaptioner" in result.stderr


def test_driver_killed_mid_run_resumes_without_recomputing(reference, tiny_models, shards, tmp_path):
    out = tmp_path / "run"
    cap, flt = tiny_models
    cmd = [
        sys.executable,
        "-m",
        "capfilt.cli",
        "run",
        *shards,
        "--out",
        str(out),
        "--captioner",
        cap,
        "--filter",
        flt,
        "--config",
        "tiny",
        "--set",
        "run.actors=2",
        "--set",
        "caption.num_captions=2",
        "--local",
    ]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while not list(out.glob("*.done")) and proc.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
    first = {p.name: p.stat().st_mtime_ns for p in out.glob("*.done")}
    assert 1 <= len(first) < 4, "the driver should die after its first committed shard"
    summary = run_round(tiny_cfg(), shards, str(out), cap, flt, local=True, progress=False)
    assert summary["this_invocation"]["shards"] == 4 - len(first)
    assert {n: (out / n).stat().st_mtime_ns for n in first} == first
    assert outputs(out).keys() == outputs(reference).keys()
    # local (driver threads) and Ray actors (1 thread) may differ in float rounding; the captions may not
    for name in outputs(reference):
        if name.endswith(".scores.parquet"):
            import pyarrow.parquet as pq

            texts = [[c["text"] for c in r["candidates"]] for r in pq.read_table(out / name).to_pylist()]
            ref = [[c["text"] for c in r["candidates"]] for r in pq.read_table(reference / name).to_pylist()]
            assert texts == ref


def test_a_calibrating_driver_imports_no_torch_and_scores_on_an_actor(pool, tiny_models, shards, tmp_path):
    """The models live in the actors, calibration included: a round's driver imports neither torch nor
    transformers (5-7 s of one core at start-up, docs/BENCHMARKS.md), and the actor's calibration scores
    are those of the same worker in this process. Without Ray, the driver imports no Ray either."""
    out, (cap, flt), human = tmp_path / "run", tiny_models, shards[2:]
    sets = ["run.actors=2", "filter.calibration=keep", "filter.keep_share=0.8"]
    where = "processes=True" if pool["processes"] else "address='auto'"
    code = (
        "import sys; from capfilt.config import load_config; from capfilt.run.round import run_round; "
        f"s = run_round(load_config('tiny', {sets!r}), {shards[:2]!r}, {str(out)!r}, {cap!r}, {flt!r}, "
        f"{where}, progress=False, human={human!r}); "
        "print(s['shards_done'], s['threshold_mode'], [m for m in ('torch', 'transformers') if m in sys.modules],"
        " 'ray' in sys.modules)"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().splitlines()[-1] == f"2 keep [] {not pool['processes']}"
    cal = json.loads((out / "calibration.json").read_text())
    here = ShardWorker(load_config("tiny", sets), cap, flt, device="cpu").calibration(human)
    assert cal["n_human"] == here["n_human"] == 20
    for key in ("human_itm", "mismatched_itm"):  # an actor's one thread against this process's threads
        assert cal[key] == pytest.approx(here[key], abs=1e-5)


def test_bench_round_joins_a_running_cluster_or_runs_without_ray(pool, tiny_world, tmp_path):
    """`capfilt bench --parts round --address auto`: the round joins the running Ray (as a scheduled job
    does; ``ray.init(address="auto")`` fails where none runs) instead of starting its own; with
    ``--processes`` it runs (and is timed as a command) on worker processes."""
    args = ["bench", "-c", "tiny", "--world", tiny_world, "--parts", "round", "--random-models"]
    where = ["--processes"] if pool["processes"] else ["--address", "auto"]
    argv = [sys.executable, "-m", "capfilt.cli", *args, *where]
    done = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout[: done.stdout.rindex("}") + 1])["round"]
    ray_is = "none: worker processes" if pool["processes"] else "joined auto"
    assert result["ray"] == ray_is and result["images"] == 64
    assert len(result["startup_seconds"]["workers"]) == 1  # the tiny config's one actor
    assert all(v > 0 for v in result["ratios"].values())


@pytest.mark.slow
def test_ray_job_submit_runs_the_pipeline(tiny_models, shards, tmp_path):
    """A real head node; the job goes in through pipelines/submit_round.sh, the cron example."""
    if ray.is_initialized():
        ray.shutdown()
    port, dash = free_port(), free_port()
    temp = tempfile.mkdtemp(prefix="cfray", dir="/tmp")  # Unix socket paths must stay short
    head = ray_node(
        "--head",
        f"--port={port}",
        "--num-cpus=2",
        "--include-dashboard=true",
        f"--dashboard-port={dash}",
        f"--temp-dir={temp}",
    )
    out = tmp_path / "run"
    env = {
        **RAY_ENV,
        "RAY_ADDRESS": f"http://127.0.0.1:{dash}",
        "SHARDS": str(Path(shards[0]).parent / "web-*.tar"),
        "OUT": str(out),
        "CAPTIONER": tiny_models[0],
        "FILTER": tiny_models[1],
        "CONFIG": "tiny",
        "PYTHON": sys.executable,  # the project's interpreter: `python` on PATH may lack capfilt's deps
    }
    try:
        wait_for_dashboard(dash, head)
        done = submit_job(["pipelines/submit_round.sh", "--set", "run.actors=1"], env)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    finally:
        stop_node(head)
        shutil.rmtree(temp, ignore_errors=True)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["shards_done"] == 4 and summary["n_in"] == 40
