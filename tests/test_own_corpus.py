"""A team's own corpus, met as a user meets it: images without alt-text, image-only shards, command-line
mistakes, and models from the HF hub cache."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import scrambled
from run_helpers import png
from typer.testing import CliRunner

from capfilt.cli import app
from capfilt.data.reader import iter_shard
from capfilt.data.writer import write_tar

pytest_plugins = ["run_helpers"]  # tiny_models, tiny_shards

TINY_RUN = ["-c", "tiny", "--set", "caption.num_captions=2", "--set", "filter.threshold=0", "--local"]


def test_images_without_alt_text_are_captioned_and_image_only_shards_work(tmp_path, tiny_models):
    """img2dataset writes an empty .txt where a page had no alt-text; some shards have no .txt at all."""
    mixed = [(f"m{i}.png", png(i)) for i in range(6)]
    mixed += [("m0.txt", b"a red square"), ("m1.txt", b""), ("m2.txt", b"  \n"), ("m3.txt", b"\xff\xfe")]
    mixed += [("m4.json", b'{"caption": null, "url": "http://x/4"}')]  # m5: image only
    write_tar(str(tmp_path / "web-000000.tar"), sorted(mixed))
    write_tar(str(tmp_path / "web-000001.tar"), [(f"o{i}.jpg", png(10 + i)) for i in range(4)])
    cap, flt = tiny_models
    out = tmp_path / "run"
    result = CliRunner().invoke(
        app,
        ["run", str(tmp_path / "web-*.tar"), "-o", str(out), "--captioner", cap, "--filter", flt, *TINY_RUN],
    )
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "summary.json").read_text())
    assert json.loads(result.stdout) == summary  # the same JSON on stdout, for jq and schedulers' logs
    assert summary["n_in"] == 10 and summary["rejected"] == {"bad_text": 1}  # m3: a caption, not UTF-8
    assert summary["no_web_caption"] == 8 and summary["kept"] + summary["dropped"] == 9
    image_only = json.loads((out / "web-000001.stats.json").read_text())
    assert (image_only["n_in"], image_only["kept"], image_only["no_web_caption"]) == (4, 4, 4)
    rows = {r["key"]: r for p in out.glob("*.scores.parquet") for r in pq.read_table(p).to_pylist()}
    assert [c["source"] for c in rows["m0"]["candidates"]] == ["web", "synthetic", "synthetic"]
    for key in ("m1", "m2", "m4", "m5", "o0", "o3"):
        assert [c["source"] for c in rows[key]["candidates"]] == ["synthetic", "synthetic"], key
    written = {s.key: s for s in iter_shard(str(out / "web-000001.tar"))}
    assert sorted(written) == ["o0", "o1", "o2", "o3"]
    assert all(s.caption in [c["text"] for c in rows[k]["candidates"]] for k, s in written.items())


def test_a_users_mistake_is_one_line_and_exit_code_2(tmp_path, tiny_models):
    cap, flt = tiny_models
    shard = tmp_path / "web-000000.tar"
    write_tar(str(shard), [("a.png", png(0)), ("a.txt", b"a caption")])
    write_tar(str(tmp_path / "images.tar"), [("a.png", png(0)), ("b.png", png(1)), ("b.txt", b" ")])
    runner = CliRunner()
    cases = {
        "missing shard": (
            ["run", str(tmp_path / "nope-*.tar"), "--captioner", cap, "--filter", flt],
            "check",
        ),
        "unknown --set key": (["model-info", "-c", "tiny", "--set", "model.widht=3"], "valid keys are"),
        "not a model": (
            ["run", str(shard), "--captioner", str(tmp_path), "--filter", flt],
            "no model.safetensors",
        ),
        "not in the hub cache": (
            ["run", str(shard), "--captioner", "org/none", "--filter", flt],
            "hf download",
        ),
        "eval of nothing (it printed {})": (["eval"], "nothing to evaluate"),
        "eval of a run without labels (it printed {})": (["eval", "--run", str(tmp_path)], "pass --labels"),
        "eval of a model without test shards": (["eval", "--filter", flt], "held-out shards"),
        "eval on images without captions (it was a traceback from CIDEr)": (
            ["eval", str(tmp_path / "images.tar"), "--captioner", cap, "-c", "tiny"],
            "no held-out image to evaluate on",
        ),
        "eval on img2dataset's Parquet file (it said only 'left out: {}')": (
            ["eval", str(tmp_path / "00000.parquet"), "--captioner", cap, "-c", "tiny"],
            "not a tar archive but a Parquet file: it starts with b'PAR1",
        ),
    }
    pq.write_table(pa.table({"key": ["a"], "caption": ["a caption"]}), tmp_path / "00000.parquet")
    for name, (args, fix) in cases.items():
        if args[0] == "run":
            args = [*args, "-o", str(tmp_path / "out"), "-c", "tiny", "--local"]
        result = runner.invoke(app, args, env={"HF_HUB_OFFLINE": "1"})
        assert result.exit_code == 2, (name, result.output)
        assert result.stdout == "" and len(result.stderr.strip().splitlines()) == 1, (name, result.stderr)
        assert result.stderr.startswith("capfilt: error: ") and fix in result.stderr, (name, result.stderr)


def test_a_file_that_is_no_tar_is_named_with_why(tmp_path, tiny_models, tiny_shards):
    """img2dataset's Parquet file given by name to a round is a shard that ends at once. The note named it
    and sent the user to `capfilt inspect` for why; the stats, the summary and the note now say why."""
    cap, flt = tiny_models
    pq.write_table(pa.table({"key": ["a"], "caption": ["a caption"]}), tmp_path / "00000.parquet")
    bad = str(tmp_path / "00000.parquet")
    args = ["run", tiny_shards[0], bad, "-o", str(tmp_path / "out"), "-c", "tiny", "--local"]
    args += ["--captioner", cap, "--filter", flt]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    why = summary["ended_early"][bad]
    assert why.startswith("not a tar archive but a Parquet file: it starts with b'PAR1") and summary[
        "truncated_shards"
    ] == [bad]
    assert f"1 of 2 shards ended early ({bad}: {why}; ended_early in summary.json)" in result.stderr
    stats = json.loads((tmp_path / "out" / "00000.parquet.stats.json").read_text())
    assert (stats["n_in"], stats["truncated"], stats["truncation_detail"]) == (0, True, why)


def test_a_shard_tarred_from_a_folder_is_cleaned_whole(tmp_path, tiny_models, tiny_shards):
    """``tar -cf web.tar folder/`` without ``--sort=name`` lists the files in the folder's hash order.
    Before, each run of a key's files was a sample: images cleaned without their captions, captions
    rejected (``split_sample``, ``missing_image``), 29 "samples" of 10, 2 of them whole. Now the round reads
    it again, grouped by key: the same scores as the shard in key order, an output whose samples are whole,
    a line on stderr, and ``select`` and a finetuning read it the same way. Too few pairs to train on is one
    line too."""
    cap, flt = tiny_models
    for folder in ("sorted", "hashed"):
        (tmp_path / folder).mkdir()
    shutil.copy(tiny_shards[0], tmp_path / "sorted" / "web-000000.tar")
    hashed = str(tmp_path / "hashed" / "web-000000.tar")
    scrambled(tiny_shards[0], hashed)
    runner, rows, results = CliRunner(), {}, {}
    for folder in ("sorted", "hashed"):
        out = tmp_path / f"{folder}-run"
        shard = str(tmp_path / folder / "web-000000.tar")
        results[folder] = runner.invoke(
            app, ["run", shard, "-o", str(out), "--captioner", cap, "--filter", flt, *TINY_RUN]
        )
        assert results[folder].exit_code == 0, results[folder].output
        table = pq.read_table(out / "web-000000.scores.parquet").drop_columns(["shard"])
        rows[folder] = sorted(table.to_pylist(), key=lambda r: r["key"])
        written = list(iter_shard(str(out / "web-000000.tar")))  # streamed: each sample's files together
        assert sorted(s.key for s in written) == [r["key"] for r in rows[folder] if r["kept"]]
    itc = {f: [c.pop("itc") for r in rows[f] for c in r["candidates"]] for f in rows}  # the batch's last bits
    assert rows["hashed"] == rows["sorted"] and len(rows["sorted"]) == 9
    assert itc["hashed"] == pytest.approx(itc["sorted"], abs=1e-6)
    summary = json.loads((tmp_path / "hashed-run" / "summary.json").read_text())
    assert (summary["n_in"], summary["rejected"], summary["unordered_shards"]) == (
        10,
        {"undecodable_image": 1},
        [hashed],
    )
    assert "1 of 1 shards were not in key order" in results["hashed"].stderr
    assert "not in key order" not in results["sorted"].stderr
    select = runner.invoke(
        app, ["select", str(tmp_path / "hashed-run"), "-o", str(tmp_path / "sel"), "--threshold", "0.6"]
    )
    assert select.exit_code == 0, select.output
    assert json.loads(select.stdout)["unordered_shards"] == [hashed]
    one = str(tmp_path / "one.tar")
    write_tar(one, [("a.png", png(0)), ("a.txt", b"a caption")])
    tune = runner.invoke(app, ["finetune", cap, one, "-o", str(tmp_path / "ft"), "-c", "tiny"])
    assert tune.exit_code == 2 and "1 training pairs, fewer than one global batch of 8" in tune.stderr


def _hub_cache(home: Path, repo_id: str, folder: str, sha: str) -> None:
    """huggingface_hub's cache layout for ``repo_id`` at commit ``sha`` (branch main), as `hf download` leaves it."""
    repo = home / "hub" / f"models--{repo_id.replace('/', '--')}"
    shutil.copytree(folder, repo / "snapshots" / sha)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(sha)


def test_run_with_models_from_the_hf_hub_cache_offline(tmp_path, tiny_models):
    cap, flt = tiny_models
    home = tmp_path / "hf"
    cap_sha, flt_sha = "a" * 40, "b" * 40
    _hub_cache(home, "org/tiny-captioner", cap, cap_sha)
    _hub_cache(home, "org/tiny-filter", flt, flt_sha)
    write_tar(
        str(tmp_path / "web-000000.tar"), [("a.png", png(0)), ("a.txt", b"a caption"), ("b.png", png(1))]
    )
    env = {**os.environ, "HF_HOME": str(home), "HF_HUB_OFFLINE": "1", "PYTHONPATH": os.getcwd()}
    env.pop("HF_HUB_CACHE", None)
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "capfilt.cli", "run", str(tmp_path / "web-000000.tar"), "-o", str(out)]
    cmd += ["--captioner", "org/tiny-captioner", "--filter", f"org/tiny-filter@{flt_sha}", *TINY_RUN]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.count("[model] loaded") == 2 and "Loading weights" not in proc.stderr
    provenance = json.loads((out / "web-000000.stats.json").read_text())["provenance"]["models"]
    assert provenance["captioner"]["id"] == "org/tiny-captioner"
    assert provenance["captioner"]["revision"] == cap_sha and provenance["filter"]["revision"] == flt_sha
    assert len(provenance["filter"]["hash"]) == 64
    assert json.loads((out / "summary.json").read_text())["n_in"] == 2


def test_a_bug_keeps_its_traceback_without_local_variables():
    """Not a user's mistake: the traceback stays (exit 1), but no locals (they can be whole tensors)."""
    code = (
        "import capfilt.model.info as info\n"
        "def describe(cfg):\n"
        "    secret_tensor_name = 1\n"
        "    return secret_tensor_name / 0\n"
        "info.describe = describe\n"
        "from capfilt.cli import app\n"
        "app(['model-info', '-c', 'tiny'])\n"
    )
    env = {**os.environ, "PYTHONPATH": os.getcwd(), "COLUMNS": "200"}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1 and "ZeroDivisionError" in proc.stderr, proc.stderr
    assert "Traceback" in proc.stderr and "secret_tensor_name = 1" not in proc.stderr, proc.stderr
