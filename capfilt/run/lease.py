"""One job at a time in an output folder: a lease file that the running job keeps renewing.

Two rounds in one folder (a nightly job that starts while last night's is still cleaning its backlog)
would clean the same shards twice, on twice the GPUs, and delete each other's temp files, failing each
other's shards; two trainings in one folder would resume from each other's checkpoints. So a round, a
bootstrap and a training job write ``OUT/lease.json`` (who holds it, and when it was last renewed)
before any work, renew it every ``RENEW_S`` from a thread, and delete it when they end. A job that
finds a lease renewed less than ``STALE_S`` ago refuses, naming the holder. A killed job's lease is
taken over at once on the same host (its process is gone), elsewhere once it is stale.

The lease is created only if none exists (fsspec's exclusive ``"xb"`` mode: ``O_EXCL`` on a disk,
``If-None-Match: *`` on S3), so of two jobs started in the same moment one goes ahead and one refuses.
Taking over a dead job's lease is not atomic: the job re-reads it and removes it only if it is still
the dead job's, then creates its own exclusively; two jobs doing that in the same millisecond can both
go ahead. A store without exclusive creation gets a check and a write, two steps. A job that finds
at renewal that another took its lease over (it stalled past ``STALE_S``) says so, stops renewing and
sets ``lost``: a round then takes no new shard, and ends with ``LeaseLost`` without a summary; its
workers read the lease before each shard's commit and commit none of another job's folder; the first
worker to find it taken ends the round at once (its ``LeaseLost`` is not retried like a failed shard). A
training's ranks, which may run on other nodes than the job that holds the lease, read it themselves
before each checkpoint (``check_held``) and stop with ``LeaseLost`` rather than write beside the job
that took over.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import sys
import threading
import time
import uuid
from typing import Any

from fsspec.core import url_to_fs

from capfilt.data import writer
from capfilt.errors import UserError
from capfilt.run import ledger

LEASE = "lease.json"
RENEW_S = 30.0
STALE_S = 120.0
TRIES = 5  # to create the lease, each after finding none or a dead job's


class RunBusy(UserError):
    """Another job holds the output folder's lease."""


class LeaseLost(UserError):
    """Another job took the folder's lease over while this one held it (this one stalled past STALE_S)."""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def lease_url(out: str) -> str:
    """Where the lease of the folder ``out`` is."""
    return out.rstrip("/") + "/" + LEASE


def taken_over(held: dict[str, Any] | None, owner: str) -> bool:
    """Whether ``held`` (the folder's lease, None if there is none) is another job's than ``owner``'s."""
    return held is not None and held.get("owner") != owner


def check_held(url: str, owner: str) -> None:
    """Raise ``LeaseLost`` if the lease at ``url`` is now another job's than ``owner``'s: what a training
    rank checks before it writes, wherever it runs (the holder's ``lost`` lives in the driver)."""
    held = ledger.read_json(url)
    if taken_over(held, owner):
        raise LeaseLost(
            f"{url.rsplit('/', 1)[0]}: another job (host {held.get('host')}, pid {held.get('pid')}) took "
            "this job's lease over while it was stalled; this one stopped, and leaves the folder to it"
        )


def holder_alive(lease: dict[str, Any], now: float) -> bool:
    """Whether the job that wrote ``lease`` may still be running: renewed recently, and, when it ran
    on this host, its process still exists."""
    if now - lease["renewed"] >= STALE_S:
        return False
    return lease["host"] != socket.gethostname() or _alive(lease["pid"])


def holder(out: str) -> dict[str, Any] | None:
    """The lease of the job that holds ``out`` now; None while no live job does."""
    held = ledger.read_json(lease_url(out))
    return held if held is not None and holder_alive(held, time.time()) else None


class Lease:
    """``with Lease(out):`` around a job; refuses (``RunBusy``) while another job holds ``out``."""

    def __init__(self, out: str):
        self.url = lease_url(out)
        self.me = {"owner": uuid.uuid4().hex, "host": socket.gethostname(), "pid": os.getpid()}
        self._stop = threading.Event()
        self.lost = threading.Event()  # set once another job has taken the lease over
        self._thread = threading.Thread(target=self._renew_until_stopped, name="capfilt-lease", daemon=True)

    @property
    def owner(self) -> str:
        return self.me["owner"]

    def check(self) -> None:
        """Raise ``LeaseLost`` if another job holds the lease now (read from the store, not ``lost``, which
        the renewal sets up to ``RENEW_S`` late): before a job writes its final outputs."""
        check_held(self.url, self.owner)

    def _record(self) -> dict[str, Any]:
        return self.me | {"renewed": time.time()}

    def _write(self) -> None:
        ledger.write_json(self.url, self._record())

    def _create(self) -> bool:
        """Write the lease if none exists; False if one does."""
        fs, path = url_to_fs(self.url)
        try:
            with fs.open(path, "xb") as f:
                f.write(json.dumps(self._record()).encode())
        except FileExistsError:
            return False
        except FileNotFoundError:  # on an object store (locally its folder was made): no such bucket
            raise writer.missing_bucket(self.url.rsplit("/", 1)[0]) from None
        except (ValueError, NotImplementedError):  # a store without exclusive creation: check, then write
            if fs.exists(path):
                return False
            self._write()
        return True

    def _held(self) -> dict[str, Any] | None:
        """The lease in the folder, if any."""
        try:
            return ledger.read_json(self.url)
        except ValueError as err:
            raise RunBusy(
                f"{self.url} cannot be read ({err}): another job is writing it this instant, or it is "
                "damaged; delete it if no capfilt job is running in that folder"
            ) from None

    def _renew_until_stopped(self) -> None:
        while not self._stop.wait(RENEW_S):
            try:
                held = self._held()
                if taken_over(held, self.owner):
                    print(  # this job stalled past STALE_S: never overwrite the job that took over
                        f"[capfilt] another job took over {self.url} (host {held.get('host')}, pid "
                        f"{held.get('pid')}) while this one was stalled",
                        file=sys.stderr,
                        flush=True,
                    )
                    self.lost.set()
                    return
                self._write()
            except (OSError, RunBusy) as err:  # a hiccup: the next renewal tries again, well before stale
                print(f"[capfilt] could not renew {self.url}: {err}", file=sys.stderr, flush=True)

    def __enter__(self) -> Lease:
        fs, path = url_to_fs(self.url)
        try:
            writer.make_folder(fs, path.rsplit("/", 1)[0])
        except FileExistsError:  # a file where the folder should be
            raise UserError(
                f"{self.url.rsplit('/', 1)[0]} is a file; give a folder (new or an earlier run's)"
            ) from None
        for _ in range(TRIES):
            if self._create():
                break
            held = self._held()
            if held is None:  # let go between our create and our read: try again
                continue
            if holder_alive(held, time.time()):
                ago = time.time() - held["renewed"]
                raise RunBusy(
                    f"{self.url.rsplit('/', 1)[0]} is being written by another capfilt job (host "
                    f"{held['host']}, pid {held['pid']}, renewed {ago:.0f} s ago). Wait for it to finish; a "
                    f"job that died elsewhere leaves its lease stale {STALE_S:.0f} s after its last renewal"
                )
            if self._held() == held:  # still the dead job's, not one that took it over meanwhile
                with contextlib.suppress(FileNotFoundError):
                    fs.rm(path)
        else:
            raise RunBusy(f"{self.url}: other jobs kept taking the lease; try again")
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        held = ledger.read_json(self.url)
        if held is not None and held.get("owner") == self.me["owner"]:  # not a job that took it over
            fs, path = url_to_fs(self.url)
            fs.rm(path)
