"""One job at a time in an output folder: a lease file that the running job keeps renewing.

Two rounds in one folder (a nightly job that starts while last night's is still cleaning its backlog)
would clean the same shards twice, on twice the GPUs, and delete each other's temp files, failing each
other's shards; two trainings in one folder would resume from each other's checkpoints. So a round, a
bootstrap and a training job write ``OUT/lease.json`` (who holds it, and when it was last renewed)
before any work, renew it every ``RENEW_S`` from a thread, and delete it when they end. A job that
finds a lease renewed less than ``STALE_S`` ago refuses, naming the holder. A killed job's lease is
taken over at once on the same host (its process is gone), elsewhere once it is stale.

The check and the write are two steps, not one atomic operation (object stores have no portable
create-if-absent): two jobs started within the same moment can both go ahead, as before.
"""

from __future__ import annotations

import os
import socket
import sys
import threading
import time
import uuid
from typing import Any

from fsspec.core import url_to_fs

from capfilt.errors import UserError
from capfilt.run import ledger

LEASE = "lease.json"
RENEW_S = 30.0
STALE_S = 120.0


class RunBusy(UserError):
    """Another job holds the output folder's lease."""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def holder_alive(lease: dict[str, Any], now: float) -> bool:
    """Whether the job that wrote ``lease`` may still be running: renewed recently, and, when it ran
    on this host, its process still exists."""
    if now - lease["renewed"] >= STALE_S:
        return False
    return lease["host"] != socket.gethostname() or _alive(lease["pid"])


class Lease:
    """``with Lease(out):`` around a job; refuses (``RunBusy``) while another job holds ``out``."""

    def __init__(self, out: str):
        self.url = out.rstrip("/") + "/" + LEASE
        self.me = {"owner": uuid.uuid4().hex, "host": socket.gethostname(), "pid": os.getpid()}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._renew_until_stopped, name="capfilt-lease", daemon=True)

    def _write(self) -> None:
        ledger.write_json(self.url, self.me | {"renewed": time.time()})

    def _renew_until_stopped(self) -> None:
        while not self._stop.wait(RENEW_S):
            try:
                self._write()
            except OSError as err:  # a store's hiccup: the next renewal tries again, well before stale
                print(f"[capfilt] could not renew {self.url}: {err}", file=sys.stderr, flush=True)

    def __enter__(self) -> Lease:
        fs, path = url_to_fs(self.url)
        fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
        held = ledger.read_json(self.url)
        if held is not None and holder_alive(held, time.time()):
            ago = time.time() - held["renewed"]
            raise RunBusy(
                f"{self.url.rsplit('/', 1)[0]} is being written by another capfilt job (host {held['host']}, "
                f"pid {held['pid']}, renewed {ago:.0f} s ago). Wait for it to finish; a job that died "
                f"elsewhere leaves its lease stale {STALE_S:.0f} s after its last renewal"
            )
        self._write()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        held = ledger.read_json(self.url)
        if held is not None and held.get("owner") == self.me["owner"]:  # not a job that took it over
            fs, path = url_to_fs(self.url)
            fs.rm(path)
