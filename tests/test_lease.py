"""One job at a time in an output folder: the lease, alone and in front of a round and a training."""

import json
import os
import socket
import subprocess
import sys
import threading
import time

import pytest
from run_helpers import tiny_cfg

from capfilt.config import load_config
from capfilt.errors import UserError
from capfilt.run import lease
from capfilt.run.lease import Lease, LeaseLost, RunBusy, holder_alive
from capfilt.run.round import run_round
from capfilt.run.worker import ShardWorker
from capfilt.train.finetune import finetune
from capfilt.train.pretrain import pretrain

pytest_plugins = ["run_helpers"]  # tiny_models, tiny_shards
HOST = socket.gethostname()


def dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_a_holder_is_alive_while_it_renews_and_its_process_exists():
    now = time.time()
    assert holder_alive({"host": HOST, "pid": os.getpid(), "renewed": now - 5}, now)
    assert not holder_alive({"host": HOST, "pid": os.getpid(), "renewed": now - lease.STALE_S}, now)
    assert not holder_alive({"host": HOST, "pid": dead_pid(), "renewed": now}, now)  # killed here
    assert holder_alive({"host": "another-node", "pid": dead_pid(), "renewed": now - 5}, now)


def test_a_second_round_is_refused_until_the_first_lets_go(tmp_path):
    out = str(tmp_path / "run")
    with Lease(out):
        held = json.loads((tmp_path / "run" / "lease.json").read_text())
        assert (held["host"], held["pid"]) == (HOST, os.getpid())
        with pytest.raises(RunBusy, match=f"another capfilt job \\(host {HOST}, pid {os.getpid()}"):
            with Lease(out):
                pass
    assert not (tmp_path / "run" / "lease.json").exists()
    with Lease(out):  # free again
        pass


def test_a_dead_or_stale_holder_is_taken_over_and_its_lease_left_alone_after(tmp_path):
    path = tmp_path / "lease.json"
    for stale in (
        {"owner": "x", "host": HOST, "pid": dead_pid(), "renewed": time.time()},
        {"owner": "x", "host": "another-node", "pid": 1, "renewed": time.time() - lease.STALE_S - 1},
    ):
        path.write_text(json.dumps(stale))
        with Lease(str(tmp_path)):
            assert json.loads(path.read_text())["pid"] == os.getpid()
        assert not path.exists()
    with Lease(str(tmp_path)):  # a round that took the lease over from this one: its lease stays
        path.write_text(json.dumps({"owner": "y", "host": HOST, "pid": os.getpid(), "renewed": time.time()}))
    assert json.loads(path.read_text())["owner"] == "y"


def race(folder: str, jobs: int = 6) -> tuple[list[Lease], list[Lease]]:
    """``jobs`` threads that take ``folder``'s lease at the same moment: (those that got it, refused)."""
    start, wins, refused = threading.Barrier(jobs), [], []

    def job():
        held = Lease(folder)
        start.wait()
        try:
            held.__enter__()
        except RunBusy:
            refused.append(held)
            return
        wins.append(held)

    threads = [threading.Thread(target=job) for _ in range(jobs)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return wins, refused


@pytest.mark.parametrize("store", ["local", "s3"])
def test_of_jobs_that_start_at_once_exactly_one_goes_ahead(store, tmp_path, request):
    """The lease is created exclusively (``O_EXCL`` on a disk, ``If-None-Match`` on S3): no job reads "no
    lease" and then writes over the lease another job wrote meanwhile."""
    out = str(tmp_path) if store == "local" else f"s3://bucket/{tmp_path.name}"
    if store == "s3":
        request.getfixturevalue("s3")
    for attempt in range(5):
        wins, refused = race(f"{out}/{attempt}")
        assert (len(wins), len(refused)) == (1, 5)
        wins[0].__exit__(None, None, None)


def test_a_lease_that_cannot_be_read_refuses_with_what_to_do(tmp_path):
    (tmp_path / "lease.json").write_text('{"owner": ')
    with pytest.raises(RunBusy, match="cannot be read .* delete it if no capfilt job is running"):
        with Lease(str(tmp_path)):
            pass


def test_a_file_where_the_folder_should_be_is_a_clear_error(tmp_path):
    """Before, `capfilt run -o FILE` ended in a FileExistsError traceback from fsspec's makedirs."""
    (tmp_path / "out").write_text("x")
    with pytest.raises(UserError, match="out is a file; give a folder"):
        with Lease(str(tmp_path / "out")):
            pass


def test_the_lease_is_renewed_while_held(tmp_path, monkeypatch):
    monkeypatch.setattr(lease, "RENEW_S", 0.05)
    with Lease(str(tmp_path)):
        first = json.loads((tmp_path / "lease.json").read_text())["renewed"]
        time.sleep(0.3)
        assert json.loads((tmp_path / "lease.json").read_text())["renewed"] > first


def test_a_job_whose_lease_was_taken_over_stops_renewing_it(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(lease, "RENEW_S", 0.05)
    other = {"owner": "y", "host": "another-node", "pid": 1, "renewed": 1.0}
    with Lease(str(tmp_path)):
        (tmp_path / "lease.json").write_text(json.dumps(other))  # as after this job stalled past STALE_S
        time.sleep(0.3)
        assert json.loads((tmp_path / "lease.json").read_text()) == other
    assert "another job took over" in capsys.readouterr().err
    assert json.loads((tmp_path / "lease.json").read_text()) == other  # and its lease stays


def test_a_round_into_a_folder_another_round_holds_refuses_before_it_starts(
    tmp_path, tiny_models, tiny_shards
):
    out = tmp_path / "run"
    out.mkdir()
    busy = {"owner": "x", "host": "another-node", "pid": 1, "renewed": time.time()}
    (out / "lease.json").write_text(json.dumps(busy))
    with pytest.raises(RunBusy, match="another-node"):
        run_round(tiny_cfg(), tiny_shards, str(out), *tiny_models, local=True, progress=False)
    assert sorted(p.name for p in out.iterdir()) == ["lease.json"]
    (out / "lease.json").unlink()
    summary = run_round(tiny_cfg(), tiny_shards, str(out), *tiny_models, local=True, progress=False)
    assert summary["shards_done"] == 3 and not (out / "lease.json").exists()


def test_a_round_whose_lease_is_taken_over_takes_no_new_shard_and_leaves_the_summary(
    tmp_path, tiny_models, tiny_shards, monkeypatch
):
    """As after this round stalled past STALE_S and another took the folder over: this one does not commit
    the shard it has (its worker reads the lease before the commit; before, it committed it), starts no
    other, and writes no summary (the other job writes it)."""
    monkeypatch.setattr(lease, "RENEW_S", 0.05)
    out, run = tmp_path / "run", ShardWorker.run
    other = {"owner": "y", "host": "another-node", "pid": 1, "renewed": time.time()}

    def stalled(self, url, *args, **kwargs):
        """The other job's lease, until it has stood for 5 renewal periods. The takeover is not atomic: a
        renewal that read this job's lease just before it was written over writes its own back (a CI run
        saw the round stop a shard late that way), so it is written again until the renewals find it."""
        stood_since = None
        while stood_since is None or time.time() - stood_since < 0.25:
            if json.loads((out / "lease.json").read_text()) != other:
                (out / "lease.tmp").write_text(json.dumps(other))
                os.replace(out / "lease.tmp", out / "lease.json")
                stood_since = time.time()
            time.sleep(0.01)
        return run(self, url, *args, **kwargs)

    monkeypatch.setattr(ShardWorker, "run", stalled)
    with pytest.raises(LeaseLost, match="another job .* took this job's lease over"):
        run_round(tiny_cfg(), tiny_shards, str(out), *tiny_models, local=True, progress=False)
    assert not list(out.glob("web-*"))
    assert not (out / "summary.json").exists() and json.loads((out / "lease.json").read_text()) == other


def test_a_renewal_that_fails_is_said_and_tried_again(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(lease, "RENEW_S", 0.05)
    write, calls = lease.ledger.write_json, []

    def flaky(url, obj):
        calls.append(url)
        if len(calls) == 2:  # the first renewal
            raise OSError("503 Slow Down")
        write(url, obj)

    monkeypatch.setattr(lease.ledger, "write_json", flaky)
    with Lease(str(tmp_path)):
        time.sleep(0.4)
    assert len(calls) > 3 and "could not renew" in capsys.readouterr().err


def test_a_training_into_a_folder_another_job_holds_refuses_before_it_trains(tmp_path, tiny_shards):
    """Two trainings in one folder would resume from each other's checkpoints."""
    busy = {"owner": "x", "host": "another-node", "pid": 1, "renewed": time.time()}
    for name in ("med", "models"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "lease.json").write_text(json.dumps(busy))
    with pytest.raises(RunBusy, match="another-node"):
        pretrain(load_config("tiny"), tiny_shards, tmp_path / "med")
    with pytest.raises(RunBusy, match="another-node"):
        finetune(load_config("tiny"), tmp_path / "med", tiny_shards, tmp_path / "models")
    assert [p.name for p in tmp_path.glob("*/*")] == ["lease.json", "lease.json"]


def test_a_training_whose_lease_is_taken_over_stops_before_its_next_checkpoint(
    tmp_path, tiny_shards, monkeypatch
):
    """As after this training stalled past STALE_S and another job took its folder over: it writes no
    checkpoint after the takeover and no final model, and leaves the other job's lease alone."""
    from capfilt.train import loop

    out, save = tmp_path / "med", loop.save_checkpoint
    other = {"owner": "y", "host": "another-node", "pid": 1, "renewed": time.time()}

    def save_then_stall(job_out, step, *args, **kwargs):
        written = save(job_out, step, *args, **kwargs)
        (out / "lease.json").write_text(json.dumps(other))
        return written

    monkeypatch.setattr(loop, "save_checkpoint", save_then_stall)
    cfg = load_config("tiny", ["pretrain.steps=8", "pretrain.checkpoint_every=4"])
    with pytest.raises(LeaseLost, match="another-node"):
        pretrain(cfg, tiny_shards, out)
    assert sorted(p.name for p in out.glob("step-*")) == ["step-4"] and not (out / "med").exists()
    assert json.loads((out / "lease.json").read_text()) == other
