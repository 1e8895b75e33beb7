"""Tiny random HF-format captioner/filter folders, tiny input shards, and real Ray nodes, for the stage,
round and cluster tests.

The round's contract with training is "HF-format folders", so random weights exercise every code path
in seconds. Import the fixtures into a test module: ``from run_helpers import tiny_models, tiny_shards``.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch
from PIL import Image
from transformers import BlipConfig, BlipForConditionalGeneration, BlipForImageTextRetrieval

from capfilt.config import load_config
from capfilt.data.sample import Sample
from capfilt.data.writer import write_samples_shard
from capfilt.model.tokenizer import special_ids, train_tokenizer

WORDS = "a red green blue yellow square circle triangle on in near the big small picture of two one".split()


def make_models(folder: Path) -> tuple[str, str]:
    """Write a random tiny captioner and filter (our [ENC] ITM convention); return their folders."""
    rng = random.Random(0)
    tokenizer = train_tokenizer([" ".join(rng.choices(WORDS, k=8)) for _ in range(200)], vocab_size=120)
    ids = special_ids(tokenizer)
    text = dict(
        vocab_size=len(tokenizer),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
        bos_token_id=ids["dec"],
        sep_token_id=ids["sep"],
        eos_token_id=ids["sep"],
        pad_token_id=ids["pad"],
        encoder_hidden_size=32,
    )
    vision = dict(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        image_size=32,
        patch_size=8,
    )
    config = BlipConfig(text_config=text, vision_config=vision, projection_dim=16, image_text_hidden_size=16)
    torch.manual_seed(0)
    paths = []
    for name, cls in (("captioner", BlipForConditionalGeneration), ("filter", BlipForImageTextRetrieval)):
        if name == "filter":
            config.capfilt = {"role": "filter", "itm_first_token": "[ENC]", "itc_temp": 0.07}
        path = folder / name
        cls(config).save_pretrained(str(path))
        tokenizer.save_pretrained(str(path))
        paths.append(str(path))
    return paths[0], paths[1]


def png(seed: int) -> bytes:
    rng = random.Random(seed)
    im = Image.new("RGB", (40, 36), tuple(rng.randrange(256) for _ in range(3)))
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


def make_shards(folder: Path, n_shards: int = 3, per_shard: int = 10) -> list[str]:
    """Input shards with one undecodable image in the first shard (a reject to account for)."""
    rng = random.Random(1)
    urls = []
    for s in range(n_shards):
        samples = [
            Sample(
                key=f"s{s}-{i:03d}",
                shard="",
                image=b"not an image" if (s, i) == (0, 3) else png(100 * s + i),
                image_ext="png",
                caption=" ".join(rng.choices(WORDS, k=5)),
                meta={"i": i},
            )
            for i in range(per_shard)
        ]
        url = str(folder / f"web-{s:06d}.tar")
        write_samples_shard(url, samples)
        urls.append(url)
    return urls


def tiny_cfg(*overrides: str):
    return load_config("tiny", ["run.actors=2", "caption.num_captions=2", *overrides])


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> tuple[str, str]:
    return make_models(tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="session")
def tiny_shards(tmp_path_factory) -> list[str]:
    return make_shards(tmp_path_factory.mktemp("shards"))


def outputs(folder: Path) -> dict[str, bytes]:
    """Every shard file's bytes; stats.json without its timings (measured) and the input's version (its
    time on the disk)."""
    files = {}
    for p in sorted(folder.glob("web-*")):
        if p.name.endswith(".stats.json"):
            measured = ("timings", "input_version")
            stats = {k: v for k, v in json.loads(p.read_text()).items() if k not in measured}
            files[p.name] = json.dumps(stats)
        elif not p.name.endswith(".done"):
            files[p.name] = p.read_bytes()
    return files


# --- real Ray nodes on this machine ------------------------------------------------------------------

ROOT = Path(__file__).resolve().parent.parent
RAY_BIN = str(Path(sys.executable).parent / "ray")
RAY_ENV = {  # throwaway loopback clusters: no token to share; the project's `ray` first on PATH
    **os.environ,
    "RAY_AUTH_MODE": "disabled",
    "PATH": f"{Path(RAY_BIN).parent}{os.pathsep}{os.environ.get('PATH', '')}",
}


_PORTS_GIVEN: set[int] = set()


def free_port() -> int:
    """A free port never handed out before in this process. The OS may give a port it just gave again
    once its socket closes: a node's ports are chosen one after the other and all close before Ray binds
    them, and a CI run once gave the head's client server and dashboard the same one."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port not in _PORTS_GIVEN:
            _PORTS_GIVEN.add(port)
            return port


def ray_node(*args: str, env: dict[str, str] | None = None) -> subprocess.Popen:
    """``ray start --block ARGS`` in its own session: ``stop_node`` ends this node and what it started, and
    nothing else (``ray stop`` would stop every Ray on a shared machine). Every port a node
    opens is a free one: Ray's fixed defaults (52365 for the dashboard agent...) collide with any other
    Ray on the machine, and with the other node of a two-node cluster."""
    ports = [
        "dashboard-agent-listen-port",
        "dashboard-agent-grpc-port",
        "metrics-export-port",
        "runtime-env-agent-port",
    ]
    if "--head" in args:
        ports.append("ray-client-server-port")
    # The node's own output goes to a file, so that a node that exits early says why (wait_for_dashboard).
    log = tempfile.NamedTemporaryFile(prefix="cfray-node-", suffix=".log", dir="/tmp", delete=False)
    node = subprocess.Popen(
        [
            RAY_BIN,
            "start",
            "--block",
            "--node-ip-address=127.0.0.1",
            "--disable-usage-stats",
            *(f"--{p}={free_port()}" for p in ports),
            *args,
        ],
        env=env or RAY_ENV,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    log.close()
    node.log_path = log.name  # type: ignore[attr-defined]
    return node


def _kill_session(sid: int) -> None:
    """SIGKILL every process of session ``sid`` at once."""
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):  # gone meanwhile
                if os.getsid(int(entry.name)) == sid:
                    os.kill(int(entry.name), signal.SIGKILL)


def stop_node(node: subprocess.Popen) -> None:
    """End a node that ``ray_node`` started as a lost machine ends: SIGKILL to every process of its session
    at once. (Ray gives each worker a process group of its own, so killing only the node's group leaves the
    workers running until they notice their raylet gone; and Ray's own shutdown on SIGTERM took 30 to 60 s
    here, for nothing a test checks.)"""
    Path(node.log_path).unlink(missing_ok=True)  # what it said matters only while it starts
    if node.returncode is not None:  # stopped already: its pid, the session's id, may be another's now
        return
    _kill_session(node.pid)
    node.wait()


def wait_for_dashboard(port: int, head: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while True:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/api/version", timeout=2)
            return
        except urllib.error.HTTPError:  # it answers (401 when token auth is on): it is up
            return
        except OSError:
            if time.time() > deadline or head.poll() is not None:
                said = Path(head.log_path).read_text(errors="replace")[-3000:]
                raise AssertionError(f"the Ray head did not come up (exit {head.poll()}):\n{said}") from None
            time.sleep(0.5)


def submit_job(cmd: list[str], env: dict[str, str] | None = None, timeout: float = 300):
    """Run a ``ray job submit`` command. The dashboard answers before the head's job agent registers;
    under load that takes a while, and Ray says so ("No available agent to submit job, please try again
    later"): retry, bounded (on a machine shared with other builds it has taken minutes). Under load the
    dashboard has also closed a submission's connection without an answer ("Connection aborted"); that is
    retried when the command names its ``--submission-id``, since a retry of a submission that did go in
    then says it already exists, and only one job runs."""
    deadline = time.time() + 300
    keyed, dropped = any(arg.startswith("--submission-id") for arg in cmd), False
    while True:
        done = subprocess.run(
            cmd, cwd=ROOT, env=env or RAY_ENV, capture_output=True, text=True, timeout=timeout
        )
        said = done.stdout + done.stderr
        if dropped and "already exists" in said:  # the dropped one went in
            return subprocess.CompletedProcess(done.args, 0, done.stdout, done.stderr)
        dropped = keyed and "Connection aborted" in said
        if not (dropped or "No available agent" in said) or time.time() > deadline:
            return done
        time.sleep(2)
