"""`capfilt bench`: the GPU path's table on the CPU at a tiny size, and the round against the HF script."""

import json
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from capfilt.bench import web_captions
from capfilt.cli import app
from capfilt.config import load_config
from capfilt.run import bench
from capfilt.run.hf_script import HFScript, script_round


@pytest.mark.parametrize("where", [[], ["--processes"]], ids=["ray", "processes-without-dali"])
def test_bench_device_cpu_writes_the_table(tiny_world, tmp_path, where, monkeypatch):
    """Its rounds run where ``capfilt run``'s do: a local Ray, or worker processes sharing the device. The
    second case runs as on a GPU machine without DALI (the device tool's): the DALI row is skipped and a
    config's ``decoder: dali`` rounds decode with Pillow, where before the row measured Pillow as DALI."""
    table = tmp_path / "table.md"
    args = ["bench", "-c", "tiny", "--world", tiny_world, "--device", "cpu", "--batch-sizes", "4,8", *where]
    if where:
        if "nvidia" in sys.modules:
            monkeypatch.delattr(sys.modules["nvidia"], "dali", raising=False)
        monkeypatch.setitem(sys.modules, "nvidia.dali", None)
        args += ["--set", "run.decoder=dali"]
    result = CliRunner().invoke(app, [*args, "--images", "16", "--actors", "1,2", "--table", str(table)])
    assert result.exit_code == 0, result.output
    rows = [line.split(" | ") for line in table.read_text().splitlines()[2:]]
    assert [r[0].strip("| ") for r in rows] == ["decode"] * (2 - len(where)) + ["model"] * 4 + ["round"] * 2
    assert "captioner + filter, batch 8, float32" in rows[-4][1] and "HF script, batch 8" in rows[-3][1]
    assert ("2 worker process(es) on one cpu, pillow" if where else "2 actor(s)") in rows[-1][1]
    assert all(float(r[2].strip(" |").replace(",", "")) > 0 for r in rows)


def test_hf_script_round_writes_what_a_round_writes(tiny_world, tmp_path):
    cfg = load_config("tiny")
    cap, flt = bench.random_models(cfg.model, tmp_path / "models", web_captions(Path(tiny_world)))
    urls = sorted(str(p) for p in Path(tiny_world).glob("web-*.tar"))
    assert script_round(cfg, urls, str(tmp_path / "hf"), HFScript(cfg, cap, flt), 8) == 64
    scores = pq.read_table(tmp_path / "hf" / "web-000000.scores.parquet").to_pylist()
    assert len(scores) == 32
    assert all([c["source"] for c in r["candidates"]] == ["web", "synthetic"] for r in scores)
    assert all(0 <= c["itm"] <= 1 and c["itc"] is None for r in scores for c in r["candidates"])


def test_the_hf_script_runs_as_a_command_without_ray(tiny_world, tmp_path):
    """The baseline as a user runs it: a fresh process (config file, models, output folder, shards) that
    writes a round's outputs for every shard and never imports Ray, whose import it would be timed with."""
    cfg = load_config("tiny")
    cap, flt = bench.random_models(cfg.model, tmp_path / "models", web_captions(Path(tiny_world)))
    ours, script = bench.commands(cfg, [f"{tiny_world}/web-*.tar"], str(tmp_path / "cmd"), cap, flt, [])
    assert ours[1:4] == ["-m", "capfilt.cli", "run"] and script[1:3] == ["-m", "capfilt.run.hf_script"]
    probe = "import runpy, sys; sys.argv = sys.argv[1:]; "
    probe += "runpy.run_module('capfilt.run.hf_script', run_name='__main__'); print('ray' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", probe, *script[2:]], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split() == ["64", "images", "False"]
    assert load_config(script[3]) == cfg  # the command reads back the very config the bench ran
    for name in ("web-000000", "web-000001"):
        assert len(pq.read_table(tmp_path / "cmd" / "hf" / f"{name}.scores.parquet")) == 32
        assert (tmp_path / "cmd" / "hf" / f"{name}.done").exists()


def test_bench_memory_reports_peak_rss_per_part_and_size(tiny_world):
    args = ["bench", "-c", "tiny", "--world", tiny_world, "--parts", "memory", "--memory-sizes", "32,96"]
    args += ["--set", "filter.calibration=keep"]  # as the demo config: the benchmark's threshold is fixed
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    rows = json.loads(result.output)["memory"]
    assert [(r["part"], r["images"]) for r in rows] == [
        ("round", 32),
        ("train", 32),
        ("round", 96),
        ("train", 96),
    ]
    assert all(r["peak_rss_mib"] > 100 for r in rows)  # torch alone is more than that
