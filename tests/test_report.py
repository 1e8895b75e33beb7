"""The HTML report: built from a real run folder and opened in a real headless Chromium."""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import subprocess
import tarfile

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from capfilt.data.writer import SCORES_SCHEMA
from capfilt.errors import UserError
from capfilt.report import bin_counts, format_table, histogram_svg, write_report


def _jpg(colour) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (32, 32), colour).save(buf, "JPEG")
    return buf.getvalue()


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


@pytest.fixture
def run_dir(tmp_path):
    """A finished single-round folder: one input shard, its scores, its summary, and a truth file."""
    shard = tmp_path / "in" / "web-000000.tar"
    shard.parent.mkdir()
    rows, truth = [], []
    with tarfile.open(shard, "w") as tar:
        for i in range(6):
            key = f"web-{i:08d}"
            _add(tar, f"{key}.jpg", _jpg((40 * i, 100, 200 - 30 * i)))
            _add(tar, f"{key}.txt", f"caption {i}".encode())
            itm_web, itm_syn = (0.9, 0.8) if i % 2 == 0 else (0.1, 0.3)
            cands = [
                {"text": f"caption {i}", "source": "web", "itm": itm_web, "itc": 0.4, "kept": itm_web >= 0.5},
                {
                    "text": f"a blue square {i}",
                    "source": "synthetic",
                    "itm": itm_syn,
                    "itc": None if i == 0 else 0.3,  # a run with filter.itc: false stores none
                    "kept": itm_syn >= 0.5,
                },
            ]
            rows.append(
                {
                    "key": key,
                    "shard": str(shard),
                    "caption": f"caption {i}" if i % 2 == 0 else "",
                    "candidates": cands,
                    "image_ext": "jpg",
                    "meta_json": "{}",
                    "kept": i % 2 == 0,
                }
            )
            truth.append({"key": key, "noisy": i % 2 == 1, "noise_type": "swap" if i % 2 else "none"})
    out = tmp_path / "run"
    out.mkdir()
    pq.write_table(pa.Table.from_pylist(rows, schema=SCORES_SCHEMA), out / "web-000000.scores.parquet")
    (out / "summary.json").write_text(json.dumps({"kept_rate_by_source": {"web": 0.5, "synthetic": 0.5}}))
    pq.write_table(pa.Table.from_pylist(truth), tmp_path / "truth.parquet")
    return out


def test_report_page_has_table_histograms_and_examples(run_dir):
    page = write_report(run_dir, truth=run_dir.parent / "truth.parquet").read_text()
    assert page.count("<svg") == 3  # web, synthetic, web by ground truth
    assert page.count('<figure class="example kept"') == 3
    assert page.count('<figure class="example dropped"') == 3
    assert "truth: noisy (swap)" in page
    assert page.count("ITC —") == 1 and page.count("ITC 0.30") == 5  # all six samples are examples
    assert "0.500" in page  # kept rate in the table


def test_a_folder_that_is_no_run_is_a_user_error(tmp_path):
    (tmp_path / "notes").mkdir()
    for folder in (tmp_path / "notes", tmp_path / "missing"):
        with pytest.raises(UserError, match="neither a bootstrap folder"):
            write_report(folder)
    assert not list(tmp_path.rglob("*.html*"))


def test_histogram_counts_each_value_once():
    counts = {"a": bin_counts(np.array([0.0, 0.5, 0.99, 1.0, np.nan]), 2), "b": bin_counts(np.array([]), 2)}
    assert counts["a"].tolist() == [1, 3] and counts["b"].tolist() == [0, 0]
    svg = histogram_svg(counts, "t")
    assert "a (n=4)" in svg and "b (n=0)" in svg


def test_the_report_reads_a_run_a_scores_file_at_a_time(run_dir):
    """Split into files of one row, the run gives the same page: the histograms add up across files, and
    the examples are the first kept and dropped rows in file order."""
    truth = run_dir.parent / "truth.parquet"
    whole = write_report(run_dir, out=run_dir.parent / "whole.html", truth=truth).read_text()
    table = pq.read_table(run_dir / "web-000000.scores.parquet")
    (run_dir / "web-000000.scores.parquet").unlink()
    for i in range(table.num_rows):
        pq.write_table(table.slice(i, 1), run_dir / f"web-{i:06d}.scores.parquet")
    assert write_report(run_dir, out=run_dir.parent / "split.html", truth=truth).read_text() == whole


def test_format_table_marks_missing_values():
    text = format_table([("round-0", {"TR@1": 0.25, "filter F1": None})])
    assert "0.250" in text and "—" in text


def _chromium() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if path is None:
        if os.environ.get("CI"):
            pytest.fail("CI must have Chromium: `make test` installs Debian's chromium")
        pytest.skip("no Chromium here; `make test` installs it")
    return path


def test_report_loads_in_headless_chromium(run_dir, tmp_path):
    page = write_report(run_dir, truth=run_dir.parent / "truth.parquet")
    profile = tmp_path / "profile"
    cmd = [
        _chromium(),
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={profile}",
        "--virtual-time-budget=5000",
        "--dump-dom",
        page.as_uri(),
    ]
    dom = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=True).stdout
    status = re.search(r'<p id="status"[^>]*>', dom)
    assert status, dom[:2000]
    attrs = dict(re.findall(r'data-(\w+)="(\d+)"', status.group(0)))
    assert attrs == {"images": "6", "broken": "0", "errors": "0"}, status.group(0)
