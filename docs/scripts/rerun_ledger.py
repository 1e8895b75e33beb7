"""A rerun's bookkeeping over N committed shards, before any model: deciding what is pending (the done
markers, now with the inputs' versions) and folding the committed shards' stats into the summary. "one
by one" is what the round did before (a request per shard, one after another); "batched" is
``ledger.pending_shards`` and ``ledger.read_stats`` now. Three repetitions, seconds.

    python docs/scripts/rerun_ledger.py 1000          # a local folder
    python docs/scripts/rerun_ledger.py 1000 --moto   # S3: a moto server on this machine
    python docs/scripts/rerun_ledger.py 1000 --moto 20   # ... behind a proxy that delays each request 20 ms

moto answers from this machine's two cores, so without a delay its own work bounds both ways alike; the
delay stands for a real store's round trip, which a batch's concurrent requests share.
"""

import asyncio
import dataclasses
import json
import os
import socket
import sys
import tempfile
import threading
import time

from fsspec.core import url_to_fs

from capfilt.data import versions
from capfilt.data.sample import ShardStats
from capfilt.run import ledger


def free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def delaying_proxy(port: int, delay_s: float) -> int:
    """A TCP proxy to ``port`` that holds each request (each read from the client) for ``delay_s``."""

    async def pipe(reader, writer, delay):
        while data := await reader.read(1 << 16):
            await asyncio.sleep(delay)
            writer.write(data)
            await writer.drain()
        writer.close()

    async def handle(client_r, client_w):
        server_r, server_w = await asyncio.open_connection("127.0.0.1", port)
        await asyncio.gather(pipe(client_r, server_w, delay_s), pipe(server_r, client_w, 0))

    proxy_port, loop = free_port(), asyncio.new_event_loop()
    loop.run_until_complete(asyncio.start_server(handle, "127.0.0.1", proxy_port))
    threading.Thread(target=loop.run_forever, daemon=True).start()
    return proxy_port


def moto_bucket(delay_ms: float) -> str:
    from moto.server import ThreadedMotoServer

    port = free_port()
    ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False).start()
    port = delaying_proxy(port, delay_ms / 1000) if delay_ms else port
    os.environ.update(
        AWS_ACCESS_KEY_ID="x",
        AWS_SECRET_ACCESS_KEY="x",
        AWS_DEFAULT_REGION="us-east-1",
        AWS_ENDPOINT_URL=f"http://127.0.0.1:{port}",
    )
    url_to_fs("s3://probe")[0].mkdir("probe")
    return "s3://probe"


def committed_run(root: str, n: int) -> tuple[list[str], str, dict[str, str]]:
    """N input shards and a run folder in which each is committed."""
    fs, _ = url_to_fs(root)
    ins, out = [f"{root}/in/web-{i:06d}.tar" for i in range(n)], f"{root}/out"
    for d in ("in", "out"):
        fs.makedirs(url_to_fs(f"{root}/{d}")[1], exist_ok=True)
    for u in ins:
        fs.pipe(url_to_fs(u)[1], b"0" * 10240)
    now, names = versions.current_versions(ins), ledger.shard_names(ins)
    for u in ins:
        marker = {"shard": u, "input_version": now[u]}
        stats = dataclasses.asdict(ShardStats(u, n_in=100, kept=90, dropped=10))
        fs.pipe(url_to_fs(f"{out}/{names[u]}.done")[1], json.dumps(marker).encode())
        fs.pipe(url_to_fs(f"{out}/{names[u]}.stats.json")[1], json.dumps(stats).encode())
    return ins, out, names


def timed(fn):
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start


n = int(sys.argv[1])
moto = sys.argv.index("--moto") if "--moto" in sys.argv else None
root = (
    moto_bucket(float(sys.argv[moto + 1]) if len(sys.argv) > moto + 1 else 0) if moto else tempfile.mkdtemp()
)
ins, out, names = committed_run(root, n)
fs = url_to_fs(out)[0]
for _ in range(3):
    pending_old, a = timed(lambda: [u for u in ins if not fs.exists(f"{out}/{names[u]}.done")])
    (jobs, changed), b = timed(lambda: ledger.pending_shards(out, names, ins))
    stats_old, c = timed(lambda: [ledger.read_json(f"{out}/{names[u]}.stats.json") for u in ins])
    stats_new, d = timed(lambda: list(ledger.read_stats(out, [names[u] for u in ins])))
    assert not pending_old and not jobs and not changed and len(stats_old) == len(stats_new) == n
    print(
        f"{n} shards: pending: one by one {a:.2f}, batched {b:.2f}; stats: one by one {c:.2f}, batched {d:.2f}"
    )
