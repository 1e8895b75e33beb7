"""Bootstrap end to end at the tiny size: round 0 and two cleaning rounds, a crash, a resume, the report.

It runs as on a team's own corpus, without truth; a labels file added afterwards (``key, split,
noisy``: no demo-world ``scene``) re-runs only the evaluations.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

import capfilt.run.round as round_module
import capfilt.train.finetune as finetune_module
import capfilt.train.pretrain as pretrain_module
from capfilt.bootstrap import BootstrapPlan, _check_manifest, bootstrap, clean
from capfilt.config import load_config
from capfilt.demo import world_plan
from capfilt.errors import UserError
from capfilt.report import round_table, write_report
from capfilt.run.lease import LeaseLost, RunBusy


@pytest.mark.slow
def test_two_rounds_without_truth_resume_after_a_crash_add_labels_and_report(
    tiny_world, tmp_path, monkeypatch
):
    cfg = load_config("tiny")
    plan = world_plan(Path(tiny_world), rounds=2)
    plan.local = True  # the Ray path of a round is tested in test_run_ray.py
    plan.truth = None  # a corpus of one's own has no truth file
    out = tmp_path / "boot"

    real = finetune_module.finetune
    calls = []

    def crash_in_round_1(*args, **kwargs):
        calls.append(args[3])
        if len(calls) == 2:
            raise RuntimeError("node lost")
        return real(*args, **kwargs)

    monkeypatch.setattr(finetune_module, "finetune", crash_in_round_1)
    with pytest.raises(RuntimeError, match="node lost"):
        bootstrap(cfg, plan, out, log=lambda _: None)
    assert (out / "round-0" / "eval.done").exists()
    assert (out / "round-1" / "pretrain.done").exists() and not (out / "round-1" / "finetune.done").exists()
    stamps = {p: p.stat().st_mtime_ns for p in out.glob("round-*/*.done")}

    monkeypatch.setattr(finetune_module, "finetune", real)
    log: list[str] = []
    rounds = [Path(r) for r in bootstrap(cfg, plan, out, log=log.append)]
    assert [r.name for r in rounds] == ["round-0", "round-1", "round-2"]
    assert {
        "round-0: pretrain already done",
        "round-1: run already done",
        "round-1: pretrain already done",
    } <= set(log)
    assert all(p.stat().st_mtime_ns == t for p, t in stamps.items()), "a finished step ran again"

    for r in rounds:
        ev = json.loads((r / "eval.json").read_text())
        assert 0 <= ev["retrieval"]["tr@1"] <= 100 and "cider" in ev["captioning"]
    for r in rounds[1:]:
        summary = json.loads((r / "run" / "summary.json").read_text())
        assert summary["n_in"] == summary["kept"] + summary["dropped"] + sum(summary["rejected"].values())
        assert (
            summary["n_in"] == 64 and not summary["failed_shards"]
        )  # every web sample of the tiny world accounted for
        assert "filtering" not in json.loads((r / "eval.json").read_text())

    labels = tmp_path / "labels.parquet"  # a team's hand labels: no scene, no noise_type
    pq.write_table(
        pq.read_table(Path(tiny_world) / "truth.parquet", columns=["key", "split", "noisy"]), labels
    )
    plan.truth = str(labels)
    stamps = {p: p.stat().st_mtime_ns for p in out.glob("round-*/*.done")}
    log.clear()
    bootstrap(cfg, plan, out, log=log.append)
    assert [line for line in log if "already done" not in line] == [f"round-{r}: eval ..." for r in range(3)]
    assert all(p.stat().st_mtime_ns == t for p, t in stamps.items() if p.name != "eval.done")
    for r in rounds[1:]:
        ev = json.loads((r / "eval.json").read_text())
        assert ev["filtering"]["n"] > 0 and "attribute_accuracy" not in ev["captioning"]

    table = round_table([str(r) for r in rounds])
    assert "round-2" in table
    assert "round-2: cleaning run" in write_report(out).read_text()

    with pytest.raises(UserError, match="another config"):
        bootstrap(load_config("tiny", ["filter.threshold=0.9"]), plan, out, log=lambda _: None)


def test_a_round_with_failed_shards_stops_the_bootstrap_before_its_step_is_done(tmp_path, monkeypatch):
    """The next model must not train on part of a round; the rerun retries what failed."""
    summary = {"shards": 3, "failed_shards": {"web-1.tar": "Traceback ...\nOSError: node lost"}}
    monkeypatch.setattr(round_module, "run_round", lambda *args, **kwargs: summary)
    plan = BootstrapPlan(web=["web-{0..2}.tar"], human=["human.tar"], test=["test.tar"], local=True)
    with pytest.raises(
        UserError, match=r"round-1's cleaning: 1 of 3 shards failed \(web-1.tar: OSError: node lost"
    ):
        clean(load_config("tiny"), plan, tmp_path / "models", tmp_path / "round-1", log=lambda _: None)
    assert not (tmp_path / "round-1" / "run.done").exists()
    summary["failed_shards"] = {}
    clean(load_config("tiny"), plan, tmp_path / "models", tmp_path / "round-1", log=lambda _: None)
    assert (tmp_path / "round-1" / "run.done").exists()


def test_a_round_image_size_the_finetuned_models_do_not_take_is_refused_before_any_work(tmp_path):
    plan = BootstrapPlan(web=["web-{0..2}.tar"], human=["human.tar"], test=["test.tar"], rounds=1)
    cfg = load_config("tiny", ["run.image_size=48"])
    with pytest.raises(UserError, match=r"finetune.image_size \(32\) px images, but run.image_size is 48"):
        bootstrap(cfg, plan, tmp_path / "boot", log=lambda _: None)
    assert not (tmp_path / "boot").exists()


def test_a_bootstrap_with_warm_actors_is_refused_before_any_work(tmp_path):
    """Each round cleans with new models: the warm actors of one would hold what the next one needs."""
    plan = BootstrapPlan(web=["web-{0..2}.tar"], human=["human.tar"], test=["test.tar"], rounds=1)
    with pytest.raises(UserError, match="keep_actors"):
        bootstrap(load_config("tiny", ["run.keep_actors=true"]), plan, tmp_path / "boot", log=lambda _: None)
    assert not (tmp_path / "boot").exists()


def test_a_bootstrap_into_a_folder_another_one_holds_is_refused_before_any_work(tmp_path):
    """A scheduled bootstrap that overlaps the previous one would train into the same folders."""
    plan = BootstrapPlan(web=["web-{0..2}.tar"], human=["human.tar"], test=["test.tar"], rounds=1)
    (tmp_path / "boot").mkdir()
    busy = {"owner": "x", "host": "another-node", "pid": 1, "renewed": time.time()}
    (tmp_path / "boot" / "lease.json").write_text(json.dumps(busy))
    with pytest.raises(RunBusy, match="another-node"):
        bootstrap(load_config("tiny"), plan, tmp_path / "boot", log=lambda _: None)
    assert sorted(p.name for p in (tmp_path / "boot").iterdir()) == ["lease.json"]


def test_a_bootstrap_taken_over_mid_step_marks_it_not_done_and_starts_no_other(tmp_path, monkeypatch):
    """A bootstrap that stalled past the lease's staleness, and that another one took over, stops: the
    step it was in is not marked done and no later step starts. Before, it went on, into the eval too,
    which holds no lease of its own, beside the job that took over."""
    plan = BootstrapPlan(web=["web-{0..2}.tar"], human=["human.tar"], test=["test.tar"])
    out = tmp_path / "boot"
    other = {"owner": "x", "host": "another-node", "pid": 1, "renewed": time.time()}

    def taken_over_while_training(cfg, shards, pre, *args):
        (out / "lease.json").write_text(json.dumps(other))
        Path(pre).mkdir(parents=True)

    monkeypatch.setattr(pretrain_module, "pretrain", taken_over_while_training)
    monkeypatch.setattr(
        finetune_module, "finetune", lambda *a: pytest.fail("finetune ran after the takeover")
    )
    with pytest.raises(LeaseLost, match="another-node"):
        bootstrap(load_config("tiny"), plan, out, log=lambda _: None)
    assert not (out / "round-0" / "pretrain.done").exists()
    assert json.loads((out / "lease.json").read_text()) == other  # the other job's, untouched


def test_a_bootstrap_records_its_shards_without_signatures_and_resumes_re_signed(tmp_path):
    """Its manifest held presigned URLs whole (a credential in a folder handed on), and a resume with
    freshly signed ones was refused as another bootstrap's inputs."""
    url = "https://host/web-0.tar?X-Amz-Expires=600&X-Amz-Signature="

    def plan(signature: str, web: str = url) -> BootstrapPlan:
        return BootstrapPlan(web=[web + signature], human=["human.tar"], test=["test.tar"])

    cfg, out = load_config("tiny"), str(tmp_path)
    _check_manifest(out, cfg, plan("first"))
    _check_manifest(out, cfg, plan("second"))
    assert json.loads((tmp_path / "manifest.json").read_text())["web"] == ["https://host/web-0.tar"]
    with pytest.raises(UserError, match="another config or inputs"):
        _check_manifest(out, cfg, plan("third", web=url.replace("web-0", "web-1")))
