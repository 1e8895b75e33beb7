"""A finished run as other teams get it: a nightly rerun over a grown shard list, the dataset card, and
common readers (HF datasets, Ray Data, webdataset, DALI) reading every kept sample the card counts."""

from __future__ import annotations

import hashlib
import json

import pytest
from run_helpers import make_shards, tiny_cfg

from capfilt.run import card
from capfilt.run.round import run_round

pytest_plugins = ["run_helpers"]  # tiny_models


@pytest.fixture(scope="module")
def grown_run(tiny_models, tmp_path_factory):
    """10 shards, then the same 10 plus 5 new ones into the same folder: (folder, both summaries)."""
    shards = make_shards(tmp_path_factory.mktemp("nightly"), n_shards=15, per_shard=4)
    out = tmp_path_factory.mktemp("run") / "clean"
    first = run_round(tiny_cfg(), shards[:10], str(out), *tiny_models, local=True, progress=False)
    marks = {p.name: p.stat().st_mtime_ns for p in out.glob("*.done")}
    second = run_round(tiny_cfg(), shards, str(out), *tiny_models, local=True, progress=False)
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*.done") if p.name in marks} == marks
    return out, first, second


def test_a_rerun_over_a_grown_list_processes_only_the_new_shards(grown_run):
    out, first, second = grown_run
    assert first["this_invocation"]["shards"] == 10 and first["shards_already_done"] == 0
    assert second["this_invocation"]["shards"] == 5 and second["shards_already_done"] == 10
    assert second["shards_done"] == 15 and second["n_in"] == 60 and not second["failed_shards"]
    assert len(second["this_invocation"]["startup_seconds"]["workers"]) == 1  # one in-process worker
    info = json.loads((out / card.DATASET_INFO).read_text())
    counts = info["counts"]
    assert (counts["shards_processed_this_time"], counts["shards_already_done"]) == (5, 10)
    assert (counts["in"], counts["kept"], counts["dropped"]) == (60, second["kept"], second["dropped"])
    assert counts["in"] == counts["kept"] + counts["dropped"] + sum(counts["rejected"].values())
    assert counts["rejected"] == {"undecodable_image": 1}
    assert len(info["files"]["webdataset"]) == 15 and len(info["inputs"]) == 15
    assert json.loads((out / card.SIZES).read_text()) == counts["kept_per_tar"]
    assert list(counts["kept_per_tar"]) == info["files"]["webdataset"]
    for url in info["inputs"]:  # which bytes were cleaned: sha256sum's of each input, old shards' too
        with open(url, "rb") as f:
            assert info["input_sha256"][url] == hashlib.sha256(f.read()).hexdigest()
    assert info["threshold"] == {"value": 0.5, "mode": "fixed", "how": card.THRESHOLD_MODES["fixed"]}
    assert set(info["models"]) == {"captioner", "filter"}
    readme = (out / card.README).read_text()
    assert f"| samples in | 60 |\n| kept | {counts['kept']} |" in readme
    assert "5 / 10" in readme and '"threshold": 0.5' in readme


def _files(out, kind: str) -> list[str]:
    info = json.loads((out / card.DATASET_INFO).read_text())
    return [str(out / f) for f in info["files"][kind]]


def _kept(out) -> int:
    return json.loads((out / card.DATASET_INFO).read_text())["counts"]["kept"]


def test_hf_datasets_and_webdataset_read_every_kept_sample(grown_run):
    import datasets
    import webdataset as wds

    out, _, _ = grown_run
    kept, tars = _kept(out), _files(out, "webdataset")
    assert kept > 0
    ds = datasets.load_dataset("webdataset", data_files={"train": tars}, split="train")
    assert len(ds) == kept and {"txt", "json", "__key__"} <= set(ds.column_names)
    assert len(datasets.load_dataset(str(out), split="train")) == kept  # the card's front matter
    assert sum(1 for _ in wds.WebDataset(tars, shardshuffle=False)) == kept
    # open_clip's get_dataset_size: {tar name: samples} from sizes.json in the tars' folder
    sizes = json.loads((out / "sizes.json").read_text())
    assert {t.rsplit("/", 1)[1]: sum(1 for _ in wds.WebDataset(t, shardshuffle=False)) for t in tars} == sizes


def test_ray_data_reads_every_kept_sample(grown_run):
    import ray

    out, _, _ = grown_run
    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=1, include_dashboard=False)
    try:
        assert ray.data.read_parquet(_files(out, "parquet")).count() == _kept(out)
        assert ray.data.read_webdataset(_files(out, "webdataset")).count() == _kept(out)
    finally:
        if started:
            ray.shutdown()


def test_dali_reads_every_kept_sample(grown_run):
    pytest.importorskip("nvidia.dali")
    from nvidia.dali import fn, pipeline_def

    out, _, _ = grown_run
    tars = _files(out, "webdataset")

    @pipeline_def(batch_size=1, num_threads=1, device_id=None)
    def pipe():
        image, text = fn.readers.webdataset(
            paths=tars, ext=["jpg;jpeg;png;webp;gif;bmp", "txt"], name="reader"
        )
        return fn.decoders.image(image, device="cpu"), text

    p = pipe()
    p.build()
    n = p.reader_meta("reader")["epoch_size"]
    texts = [bytes(p.run()[1].at(0)).decode() for _ in range(n)]
    want = sorted(r for t in tars for r in _tar_texts(t))
    assert n == _kept(out) and sorted(texts) == want


def _tar_texts(path: str) -> list[str]:
    import tarfile

    with tarfile.open(path) as tar:
        return [tar.extractfile(m).read().decode() for m in tar.getmembers() if m.name.endswith(".txt")]
