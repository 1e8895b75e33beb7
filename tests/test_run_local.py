"""The round in-process: accounting, resume, per-sample failure isolation, fsspec (S3 via moto)."""

import io
import json
import os
import shutil
import socket
import tarfile
import time
import weakref
from concurrent.futures import ThreadPoolExecutor

import pyarrow.parquet as pq
import pytest
import torch
from run_helpers import free_port, outputs, tiny_cfg
from typer.testing import CliRunner

from capfilt.cli import app
from capfilt.config import ConfigError
from capfilt.data import writer
from capfilt.data.decode import make_decoder
from capfilt.data.reader import ShardReader
from capfilt.errors import UserError
from capfilt.run.dispatch import RoundOutput
from capfilt.run.ledger import RunMismatchError
from capfilt.run.pipeline import BatchLimit, ModelFailed, decoded_batches, process_shard
from capfilt.run.reselect import reselect
from capfilt.run.round import plan_round, run_round
from capfilt.run.worker import ShardWorker

pytest_plugins = ["run_helpers"]  # tiny_models, tiny_shards
CPU = torch.device("cpu")


def test_round_accounts_for_every_sample_and_resumes(tmp_path, tiny_models, tiny_shards):
    cap, flt = tiny_models
    out = str(tmp_path / "run")
    cfg = tiny_cfg("filter.threshold=0.505")
    summary = run_round(cfg, tiny_shards, out, cap, flt, local=True, progress=False)
    assert summary["n_in"] == 30 and summary["rejected"] == {"undecodable_image": 1}
    assert summary["n_in"] == summary["kept"] + summary["dropped"] + 1
    for name in ("web-000000", "web-000001", "web-000002"):
        stats = json.loads((tmp_path / "run" / f"{name}.stats.json").read_text())
        assert stats["n_in"] == stats["kept"] + stats["dropped"] + sum(stats["rejected"].values())
        rows = pq.read_table(tmp_path / "run" / f"{name}.scores.parquet").to_pylist()
        assert len(rows) == stats["kept"] + stats["dropped"]
        assert all([c["source"] for c in r["candidates"]] == ["web", "synthetic", "synthetic"] for r in rows)
    mtimes = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "run").glob("*.done")}
    again = run_round(cfg, tiny_shards, out, cap, flt, local=True, progress=False)
    assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / "run").glob("*.done")} == mtimes
    assert again["this_invocation"]["shards"] == 0
    assert {k: again[k] for k in ("n_in", "kept", "dropped", "rejected")} == {
        k: summary[k] for k in ("n_in", "kept", "dropped", "rejected")
    }

    with pytest.raises(ConfigError, match="an ITM probability"):
        reselect(out, str(tmp_path / "strict"), threshold=1.01)
    none = reselect(out, str(tmp_path / "strict"), threshold=1.0)  # no model is loaded
    assert (none["kept"], none["dropped"], none["rejected"]) == (0, 29, {"undecodable_image": 1})
    every = reselect(out, str(tmp_path / "lax"), threshold=0.0)
    assert (every["kept"], every["n_in"]) == (29, 30)
    with tarfile.open(tmp_path / "lax" / "web-000001.tar") as tar:
        assert len([m for m in tar.getnames() if m.endswith(".png")]) == 10
    for folder, kept in (("strict", 0), ("lax", 29)):  # each selection's sample counts, for open_clip
        sizes = json.loads((tmp_path / folder / "sizes.json").read_text())
        assert list(sizes) == [f"web-00000{i}.tar" for i in range(3)] and sum(sizes.values()) == kept


def test_select_names_the_shards_its_round_did_not_commit_and_waits_for_a_running_round(
    tmp_path, tiny_models, tiny_shards
):
    """A selection of a round that was stopped covers its committed shards and lists the others as failed
    (exit 1 on the command line), rather than pass for the whole run; while a round still holds the run's
    folder, select refuses. Before, it selected the committed shards and said nothing."""
    out, lax = str(tmp_path / "run"), str(tmp_path / "lax")
    run_round(tiny_cfg(), tiny_shards[:2], out, *tiny_models, local=True, progress=False)
    (tmp_path / "run" / "web-000001.done").unlink()  # as a round stopped before that shard's commit
    lease = tmp_path / "run" / "lease.json"
    lease.write_text(
        json.dumps({"owner": "x", "host": socket.gethostname(), "pid": os.getpid(), "renewed": time.time()})
    )
    with pytest.raises(UserError, match=f"a round is still running there .*pid {os.getpid()}"):
        reselect(out, lax, threshold=0.0)
    lease.unlink()
    result = CliRunner().invoke(app, ["select", out, "-o", lax, "--threshold", "0"])
    assert result.exit_code == 1, result.output
    summary = json.loads((tmp_path / "lax" / "summary.json").read_text())
    assert (summary["shards"], summary["shards_done"]) == (2, 1)
    assert list(summary["failed_shards"]) == [tiny_shards[1]]
    assert "not committed in" in summary["failed_shards"][tiny_shards[1]]
    assert "1 of 2 shards failed" in result.stderr and not (tmp_path / "lax" / "lease.json").exists()


def test_a_worker_refuses_an_image_size_its_models_do_not_take(tmp_path, tiny_models, tiny_shards):
    """Else every image would be a caption_failed reject; a local round stops at once, with the fix."""
    size = tiny_cfg().run.image_size
    cfg = tiny_cfg(f"run.image_size={size + 16}")
    with pytest.raises(UserError, match=f"captioner's ViT takes {size}-px images.*set run.image_size={size}"):
        ShardWorker(cfg, *tiny_models)
    with pytest.raises(UserError, match="run.image_size"):
        run_round(cfg, tiny_shards, str(tmp_path / "run"), *tiny_models, local=True, progress=False)
    assert not list((tmp_path / "run").glob("web-*"))


def test_a_round_without_itc_stores_null_itc_and_still_reselects(tmp_path, tiny_models, tiny_shards):
    out = str(tmp_path / "run")
    run_round(tiny_cfg("filter.itc=false"), tiny_shards[:1], out, *tiny_models, local=True, progress=False)
    rows = pq.read_table(tmp_path / "run" / "web-000000.scores.parquet").to_pylist()
    assert rows and all(c["itc"] is None and c["itm"] is not None for r in rows for c in r["candidates"])
    assert reselect(out, str(tmp_path / "lax"), threshold=0.0)["kept"] == len(rows)


def test_reselect_refuses_an_input_shard_that_changed_since_the_round(tmp_path, tiny_models, tiny_shards):
    shard = tmp_path / "web-000000.tar"
    shutil.copy(tiny_shards[0], shard)
    out = str(tmp_path / "run")
    with pytest.raises(UserError, match="holds the input shards"):  # its outputs would replace them
        run_round(tiny_cfg(), [str(shard)], str(tmp_path), *tiny_models, local=True, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["web-000000.tar"]
    run_round(tiny_cfg(), [str(shard)], out, *tiny_models, local=True, progress=False)
    for into in (out, str(tmp_path)):  # select writes a new run, beside its inputs neither
        with pytest.raises(UserError, match="other than|holds the input shards"):
            reselect(out, into, threshold=0.0)
    with tarfile.open(shard) as tar:
        members = [(m.name, tar.extractfile(m).read()) for m in tar]
    images = [i for i, (name, _) in enumerate(members) if name.endswith((".jpg", ".png"))]
    swapped = list(members)  # the same keys, one image re-downloaded: its scores are not its image's
    swapped[images[0]] = (members[images[0]][0], members[images[1]][1])
    writer.write_tar(str(shard), swapped)
    with pytest.raises(UserError, match="has changed since .* SHA-256"):
        reselect(out, str(tmp_path / "lax"), threshold=0.0)

    # a run made before stats recorded the input's hash: a sample that is gone is still caught
    stats = tmp_path / "run" / "web-000000.stats.json"
    stats.write_text(
        json.dumps({k: v for k, v in json.loads(stats.read_text()).items() if k != "input_sha256"})
    )
    lost = pq.read_table(tmp_path / "run" / "web-000000.scores.parquet").column("key")[3].as_py() + "."
    writer.write_tar(str(shard), [(name, data) for name, data in members if not name.startswith(lost)])
    with pytest.raises(UserError, match="no longer holds 1 of the 9 samples"):
        reselect(out, str(tmp_path / "lax"), threshold=0.0)
    assert not list((tmp_path / "lax").glob("web-*")) and not list((tmp_path / "lax").glob(".web-*"))


def test_a_rerun_cleans_again_the_shards_whose_input_changed(tmp_path, tiny_models, tiny_shards, capsys):
    """A nightly rerun after a re-download into the same file names cleans those shards again; an input
    touched but unchanged gives the same bytes, and one that is gone keeps its outputs."""
    (tmp_path / "in").mkdir()
    shards = [shutil.copy(s, tmp_path / "in") for s in tiny_shards[:2]]
    out, cfg = tmp_path / "run", tiny_cfg()

    def rerun(spec: list[str], into=out) -> dict:
        return run_round(cfg, spec, str(into), *tiny_models, local=True, progress=False)

    first = rerun(shards)
    before = outputs(out)
    shutil.copy(tiny_shards[2], shards[1])  # other samples under web-000001's name
    again = rerun(shards)
    assert (
        again["this_invocation"]["inputs_changed"] == [shards[1]] and again["this_invocation"]["shards"] == 1
    )
    assert "1 input shard(s) changed since they were cleaned" in capsys.readouterr().err
    fresh = rerun([shards[1]], tmp_path / "fresh")
    assert again["n_in"] == first["n_in"] - 10 + fresh["n_in"]
    now = outputs(out)
    assert {k: v for k, v in now.items() if k.startswith("web-000001")} == outputs(tmp_path / "fresh")
    old = {k: v for k, v in before.items() if k.startswith("web-000000")}
    assert {k: v for k, v in now.items() if k.startswith("web-000000")} == old

    os.utime(shards[0])  # touched: cleaned again into the same bytes
    assert rerun(shards)["this_invocation"]["inputs_changed"] == [shards[0]] and outputs(out) == now
    assert rerun(shards)["this_invocation"]["inputs_changed"] == []
    os.remove(shards[0])  # gone (an unmounted disk, a pruned corpus): its outputs stay, counted
    gone = rerun([shards[1]])
    assert gone["this_invocation"]["inputs_changed"] == [] and gone["shards_done"] == 2
    assert outputs(out) == now


def folder_state(folder) -> dict[str, tuple[int, bytes]]:
    """Every file in ``folder`` with its modification time and bytes."""
    return {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in sorted(folder.iterdir())}


def test_a_dry_run_says_what_the_round_then_does_and_touches_nothing(tmp_path, tiny_models, tiny_shards):
    """``capfilt run --dry-run``: committed, changed and new shards as the round then finds them; no folder
    made, no file touched; a busy folder names its holder; another config is refused as the round would."""
    (tmp_path / "in").mkdir()
    shards = [shutil.copy(s, tmp_path / "in") for s in tiny_shards]
    out, cfg = tmp_path / "run", tiny_cfg()
    plan = plan_round(cfg, shards, str(out), *tiny_models)
    assert (plan["shards"], plan["committed"], plan["to_clean"]) == (3, 0, shards) and not out.exists()
    run_round(cfg, shards[:2], str(out), *tiny_models, local=True, progress=False)
    shutil.copy(tiny_shards[2], shards[1])  # re-downloaded with other samples
    before = folder_state(out)
    plan = plan_round(cfg, shards, str(out), *tiny_models)
    assert folder_state(out) == before
    assert plan["committed"] == 1 and plan["to_clean"] == shards[1:] and plan["inputs_changed"] == [shards[1]]
    summary = run_round(cfg, shards, str(out), *tiny_models, local=True, progress=False)
    assert summary["this_invocation"]["shards"] == 2 and summary["this_invocation"]["inputs_changed"] == [
        shards[1]
    ]
    assert plan_round(cfg, shards, str(out), *tiny_models)["to_clean"] == []

    other = tiny_cfg("caption.top_p=0.5")
    with pytest.raises(RunMismatchError, match="top_p"):
        plan_round(other, shards, str(out), *tiny_models)
    cleared = plan_round(other, shards, str(out), *tiny_models, new_run=True)
    assert cleared["clears_run"] and cleared["to_clean"] == shards
    held = {"owner": "y", "host": "another-node", "pid": 1, "renewed": time.time()}
    (out / "lease.json").write_text(json.dumps(held))
    argv = ["run", *shards, "-o", str(out), "--captioner", tiny_models[0], "--filter", tiny_models[1]]
    tiny = ["-c", "tiny", "--set", "run.actors=2", "--set", "caption.num_captions=2"]
    result = CliRunner().invoke(app, [*argv, *tiny, "--dry-run"])
    assert result.exit_code == 0 and json.loads(result.stdout)["held_by"]["host"] == "another-node"
    assert (out / "lease.json").read_text() == json.dumps(held)


def test_a_never_cleaned_shard_whose_input_is_gone_is_left_out_not_failed(
    tmp_path, tiny_models, tiny_shards, capsys
):
    """A shard an earlier night named, never committed (it failed, or the job was stopped), whose input is
    gone since: the nightly rerun leaves it out and says so, rather than fail on it every night; it is
    cleaned if it comes back."""
    (tmp_path / "in").mkdir()
    shards = [shutil.copy(s, tmp_path / "in") for s in tiny_shards[:2]]
    out, cfg = tmp_path / "run", tiny_cfg()

    def rerun(spec: list[str]) -> dict:
        return run_round(cfg, spec, str(out), *tiny_models, local=True, progress=False)

    both = rerun(shards)
    kept = {k: v for k, v in outputs(out).items() if k.startswith("web-000000")}
    os.remove(out / "web-000001.done")  # uncommitted, as a failed or stopped shard leaves it
    gone = shards[1] + ".away"
    os.rename(shards[1], gone)
    summary = rerun([shards[0]])
    assert summary["gone_shards"] == [shards[1]] and summary["failed_shards"] == {}
    assert summary["shards_done"] == 1 and summary["n_in"] == 10 and summary["this_invocation"]["shards"] == 0
    assert "never cleaned and their input is gone" in capsys.readouterr().err
    info = json.loads((out / "dataset_info.json").read_text())
    assert info["files"]["webdataset"] == ["web-000000.tar"] and info["counts"]["gone_shards"] == [shards[1]]
    assert {k: v for k, v in outputs(out).items() if k.startswith("web-000000")} == kept
    os.rename(gone, shards[1])  # back: cleaned again
    back = rerun([shards[0]])
    assert (
        back["gone_shards"] == [] and back["this_invocation"]["shards"] == 1 and back["n_in"] == both["n_in"]
    )


class FlakyCaptioner:
    """Raises on any batch holding a poisoned key."""

    def caption(self, pixels, keys):
        if "s0-005" in keys:
            raise RuntimeError("CUDA error: poisoned sample")
        return [["a synthetic caption"] for _ in keys]


class ConstantFilter:
    def score(self, pixels, captions):
        return [[(0.9, 0.3) for _ in caps] for caps in captions]


def test_a_failing_sample_costs_only_itself(tmp_path, tiny_shards, capsys):
    cfg = tiny_cfg()
    stats = process_shard(
        tiny_shards[0],
        str(tmp_path),
        FlakyCaptioner(),
        ConstantFilter(),
        make_decoder(cfg.run),
        cfg,
        {"test": True},
    )
    assert stats.n_in == 10 and stats.kept == 8
    assert stats.rejected == {"undecodable_image": 1, "caption_failed": 1}
    assert [r["key"] for r in stats.rejects if r["reason"] == "caption_failed"] == ["s0-005"]
    said = capsys.readouterr().err  # the batch's failure, once, with the error the sample met
    assert said.count("raised") == 1 and "(caption); retrying it in halves" in said


class MemoryBoundCaptioner:
    """Raises as a GPU out of memory does on any batch of more than 3 images; records each call's size."""

    def __init__(self):
        self.calls: list[int] = []

    def caption(self, pixels, keys):
        self.calls.append(len(keys))
        if len(keys) > 3:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.54 GiB")
        return [[f"a caption of {k}"] for k in keys]


def test_a_batch_too_big_for_memory_goes_on_in_halves_and_later_batches_in_parts_that_fit(
    tmp_path, tiny_shards, capsys
):
    """Batches of 8: the first shard's first (7 images and an undecodable one) runs out of memory. Before,
    its images then went through one at a time; now its halves (3 and 4), and the 4's halves, run as
    batches: nothing is rejected, and each image keeps its own caption. The worker's limit then holds the caption stage to parts of 2:
    the second shard's batches of 8 and 2 (all 10 decodable) go as 2, 2, 2, 2 and 2 without running out
    of memory again (without the limit: 8, 4, 2, 2, 4, 2, 2, 2, as the first shard's batch)."""
    cfg, captioner, limit = tiny_cfg(), MemoryBoundCaptioner(), BatchLimit()
    kept = [
        process_shard(
            shard, str(tmp_path), captioner, ConstantFilter(), make_decoder(cfg.run), cfg, {}, limit=limit
        ).kept
        for shard in tiny_shards[:2]
    ]
    assert kept == [9, 10]
    assert captioner.calls == [7, 3, 4, 2, 2, 2] + [2, 2, 2, 2, 2]
    assert limit.sizes == {"caption": 2}
    rows = pq.read_table(tmp_path / "web-000000.parquet").to_pylist()
    synthetic = [(r["key"], c["text"]) for r in rows for c in r["candidates"] if c["source"] == "synthetic"]
    assert len(synthetic) == 9 and all(text == f"a caption of {key}" for key, text in synthetic)
    said = capsys.readouterr().err
    assert said.count("retrying it in halves") == 1
    assert "caption ran out of memory at a batch of 7; its batches go in parts of at most 4" in said
    assert "caption ran out of memory at a batch of 4; its batches go in parts of at most 2" in said


class BrokenFilter:
    """Raises on every input, alone as in a batch: a broken model or setting, not bad data."""

    def score(self, pixels, captions):
        raise RuntimeError("mat1 and mat2 shapes cannot be multiplied (64x512 and 768x768)")


def test_a_batch_whose_every_sample_fails_fails_the_shard(tmp_path, tiny_shards, capsys):
    """Before, such a shard was committed with every sample a score_failed reject and the round exited 0,
    so a rerun after the fix skipped it. Now it stays uncommitted and the error names the cause."""
    cfg = tiny_cfg()
    with pytest.raises(ModelFailed, match=r"every sample of a batch of \d+ raised \(score\).*mat1 and mat2"):
        process_shard(
            tiny_shards[0], str(tmp_path), FlakyCaptioner(), BrokenFilter(), make_decoder(cfg.run), cfg, {}
        )
    assert not list(tmp_path.iterdir())  # nothing committed, nothing left
    assert capsys.readouterr().err.count("(score); retrying") == 1  # it failed at the first batch


def test_a_shard_leaves_memory_batch_by_batch(tmp_path, tiny_shards, monkeypatch):
    """Each scored batch goes to the writer at once, and nothing else keeps its samples (image bytes,
    carried members): when a batch reaches the writer, every earlier batch's samples are gone. Before,
    the whole shard's samples were held until the end, so a worker's memory grew with its shard's size."""
    cfg = tiny_cfg("run.batch_size=2")
    batches: list[list[weakref.ref]] = []
    alive_at_add: list[int] = []
    add = writer.RoundShardWriter.add

    def recording_add(self, results):
        alive_at_add.append(sum(ref() is not None for refs in batches for ref in refs))
        batches.append([weakref.ref(r.sample) for r in results])
        add(self, results)

    monkeypatch.setattr(writer.RoundShardWriter, "add", recording_add)
    stats = process_shard(
        tiny_shards[0], str(tmp_path), FixedCaptioner(), ConstantFilter(), make_decoder(cfg.run), cfg, {}
    )
    assert stats.kept == 9 and len(batches) == 5 and sum(map(len, batches)) == 9
    assert alive_at_add == [0] * 5
    assert len(list(ShardReader(str(tmp_path / "web-000000.tar")))) == 9


class FixedCaptioner:
    def caption(self, pixels, keys):
        return [["a synthetic caption"] for _ in keys]


class RecordingCaptioner:
    """Remembers where and in which dtype each batch's pixels reached it."""

    def __init__(self):
        self.seen = set()

    def caption(self, pixels, keys):
        self.seen.add((pixels.device.type, pixels.dtype))
        return [["a synthetic caption"] for _ in keys]


def test_the_models_get_each_batch_on_their_device_in_the_run_dtype(tmp_path, tiny_shards):
    """The read-ahead thread moves a batch once for both models (they would each copy it otherwise)."""
    cfg = tiny_cfg("run.dtype=bfloat16")
    captioner = RecordingCaptioner()
    decoder, provenance = make_decoder(cfg.run), {"test": True}
    stats = process_shard(
        tiny_shards[0], str(tmp_path), captioner, ConstantFilter(), decoder, cfg, provenance, device=CPU
    )
    assert captioner.seen == {("cpu", torch.bfloat16)} and stats.kept == 9


def test_a_worker_serving_two_shards_at_once_writes_the_same_bytes(tmp_path, tiny_models, tiny_shards):
    """Two shards in flight (as a Ray actor with run.shards_in_flight=2 runs them, from two threads) share
    the models one batch at a time and write what one shard after the other writes."""
    one = ShardWorker(tiny_cfg(), *tiny_models, device="cpu")
    for url in tiny_shards:
        one.run(url, writer.output_name(url), RoundOutput(str(tmp_path / "one"), 0.5, {"test": True}))
    two = ShardWorker(tiny_cfg("run.shards_in_flight=2"), *tiny_models, device="cpu")
    output = RoundOutput(str(tmp_path / "two"), 0.5, {"test": True})
    with ThreadPoolExecutor(2) as pool:
        stats = list(pool.map(lambda u: two.run(u, writer.output_name(u), output), tiny_shards))
    assert sum(s.n_in for s in stats) == 30 and outputs(tmp_path / "two") == outputs(tmp_path / "one")


def one_vit(folder, tiny_models) -> tuple[str, str]:
    """The tiny captioner, and the tiny filter with the captioner's ViT, as finetune.freeze_vision leaves them."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(tiny_models[1], folder)
    captioner = load_file(os.path.join(tiny_models[0], "model.safetensors"))
    state = load_file(folder / "model.safetensors")
    save_file(
        state | {k: v for k, v in captioner.items() if k.startswith("vision_model.")},
        folder / "model.safetensors",
    )
    return tiny_models[0], str(folder)


def test_models_with_one_vit_encode_each_image_once_and_write_the_same_bytes(
    tmp_path, tiny_models, tiny_shards, monkeypatch
):
    """A captioner and a filter finetuned with the ViT frozen hold the same one: the worker keeps one copy
    and encodes each batch once for both, and writes what encoding it twice writes."""
    import capfilt.stages.captioner
    import capfilt.stages.filter

    passes = []
    for module in (capfilt.stages.captioner, capfilt.stages.filter):
        encode = module.image_embeds
        monkeypatch.setattr(
            module, "image_embeds", lambda v, px, encode=encode: passes.append(len(px)) or encode(v, px)
        )
    models = one_vit(tmp_path / "filter", tiny_models)
    assert not ShardWorker(tiny_cfg(), *tiny_models, device="cpu").shared_vision
    assert not ShardWorker(tiny_cfg("caption.method=beam"), *models, device="cpu").shared_vision
    once = ShardWorker(tiny_cfg(), *models, device="cpu")
    assert once.shared_vision and once.filter.model.vision_model is once.captioner.model.vision_model
    twice = ShardWorker(tiny_cfg(), *models, device="cpu")
    twice.shared_vision = False
    for worker, out in ((once, "once"), (twice, "twice")):
        passes.clear()
        output = RoundOutput(str(tmp_path / out), 0.5, {"test": True})
        stats = [worker.run(u, writer.output_name(u), output) for u in tiny_shards]
        images = sum(s.kept + s.dropped for s in stats)  # decoded (no model failure here)
        assert sum(passes) == images * (1 if out == "once" else 2)
    assert outputs(tmp_path / "once") == outputs(tmp_path / "twice")


def test_read_decode_time_leaves_out_the_time_the_model_holds_the_batch(tiny_shards):
    """stats.json's read_decode is reading and decoding only: while the consumer works on a batch (and the
    read-ahead queue is full) the generator is suspended, and that time is the model's."""
    cfg = tiny_cfg()
    batches = []
    for batch in decoded_batches(ShardReader(tiny_shards[0]), make_decoder(cfg.run), 3):
        batches.append(batch)
        time.sleep(0.5)  # the model's turn
    assert sum(b.n_in for b in batches) == 10 and len(batches) == 4
    assert sum(b.seconds for b in batches) < 0.5  # before: 1.5 s, each batch after the first got 0.5


@pytest.fixture(scope="module")
def s3(tiny_shards):
    """A moto S3 server with the input shards uploaded; yields the bucket URL."""
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    env = {
        "AWS_ACCESS_KEY_ID": "x",
        "AWS_SECRET_ACCESS_KEY": "x",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
    }
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()
    fs = s3fs.S3FileSystem()
    fs.mkdir("capfilt-test")
    for url in tiny_shards:
        fs.put(url, f"capfilt-test/in/{os.path.basename(url)}")
    yield "s3://capfilt-test"
    server.stop()
    for k, v in old.items():
        os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
    s3fs.S3FileSystem.clear_instance_cache()


def test_round_reads_and_writes_s3(s3, tiny_models, tmp_path):
    import s3fs

    cap, flt = tiny_models
    cfg = tiny_cfg()
    summary = run_round(
        cfg, [f"{s3}/in/web-{{000000..000001}}.tar"], f"{s3}/out", cap, flt, local=True, progress=False
    )
    assert summary["shards_done"] == 2 and summary["n_in"] == 20
    fs = s3fs.S3FileSystem()
    names = sorted(os.path.basename(p) for p in fs.ls("capfilt-test/out"))
    assert "web-000001.done" in names and "manifest.json" in names and "summary.json" in names
    assert not any(n.endswith(".tmp") for n in names)

    # a rerun compares the inputs' ETags, from one listing, with those read: equal until one is re-uploaded
    spec, files = [f"{s3}/in/web-{{000000..000001}}.tar"], outputs_s3(fs, "capfilt-test/out")
    again = run_round(cfg, spec, f"{s3}/out", cap, flt, local=True, progress=False)
    assert again["this_invocation"]["inputs_changed"] == [] and again["this_invocation"]["shards"] == 0
    assert "ETag" in json.loads(fs.cat("capfilt-test/out/web-000001.done"))["input_version"]
    original = fs.cat("capfilt-test/in/web-000001.tar")
    fs.pipe("capfilt-test/in/web-000001.tar", fs.cat("capfilt-test/in/web-000002.tar"))
    changed = run_round(cfg, spec, f"{s3}/out", cap, flt, local=True, progress=False)
    fs.pipe("capfilt-test/in/web-000001.tar", original)  # the module's server, as other tests found it
    assert changed["this_invocation"]["inputs_changed"] == [f"{s3}/in/web-000001.tar"]
    now = outputs_s3(fs, "capfilt-test/out")
    assert now["web-000000.tar"] == files["web-000000.tar"]
    assert now["web-000001.tar"] != files["web-000001.tar"]


def outputs_s3(fs, folder: str) -> dict[str, bytes]:
    return {os.path.basename(p): fs.cat(p) for p in fs.ls(folder) if p.endswith(".tar")}


@pytest.fixture
def signing_server(tmp_path):
    """A real HTTP server over ``tmp_path/served`` that, like S3 behind presigned URLs, serves a file only
    to a GET whose ``X-Amz-Signature`` it issued (``sign``), lists no folder and refuses a HEAD (a URL
    signed for GET). The ``expiring`` files' signatures serve no range of bytes: they expire after the
    round has found the file and before it reads it."""
    import functools
    import http.server
    import threading
    import urllib.parse

    served = tmp_path / "served"
    served.mkdir()

    class Signed(http.server.SimpleHTTPRequestHandler):
        def do_HEAD(self):
            self.send_error(403, "signed for GET")

        def do_GET(self):
            url = urllib.parse.urlsplit(self.path)
            signature = urllib.parse.parse_qs(url.query).get("X-Amz-Signature", [""])[0]
            expired = url.path.lstrip("/") in server.expiring and "Range" in self.headers
            if signature not in server.issued or expired:
                return self.send_error(403, "SignatureDoesNotMatch")
            super().do_GET()

        def list_directory(self, path):
            self.send_error(403, "no listing")

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(Signed, directory=str(served))
    )
    server.issued, server.expiring = set(), set()
    base = f"http://127.0.0.1:{server.server_address[1]}"

    def sign(names: list[str], secret: str) -> list[str]:
        server.issued.add(secret)
        query = f"X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Expires=3600&X-Amz-Signature={secret}"
        return [f"{base}/{name}?{query}" for name in names]

    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield served, base, sign, server
    server.shutdown()


def test_presigned_shards_are_recorded_without_their_signature_and_rerun_resigned(
    tmp_path, tiny_models, tiny_shards, signing_server, capsys
):
    """A presigned URL is a credential: before, the manifest, stats, markers, the Parquet ``shard`` column
    and the dataset card held it whole, and a rerun with freshly signed URLs (the nightly case) was refused
    as other shards with the same names. A run now names each shard by its URL without signature, reads
    it by the signed one, and takes re-signed URLs as the same shards."""
    served, base, sign, server = signing_server
    names = [os.path.basename(u) for u in tiny_shards[:2]]
    for url, name in zip(tiny_shards[:2], names, strict=True):
        shutil.copy(url, served / name)
    out, cap, flt = str(tmp_path / "run"), *tiny_models
    server.expiring.add(names[1])

    first = run_round(tiny_cfg(), sign(names, "SIGNED-A"), out, cap, flt, local=True, progress=False)
    assert first["shards_done"] == 1 and list(first["failed_shards"]) == [f"{base}/{names[1]}"]
    assert "403" in first["failed_shards"][f"{base}/{names[1]}"]  # the error, its URL without signature
    server.expiring.clear()
    twice = sign(names, "SIGNED-B") + sign(names[:1], "SIGNED-C")  # one shard in two lists, signed twice
    again = run_round(tiny_cfg(), twice, out, cap, flt, local=True, progress=False)
    assert "1 shard URL(s) differ from another one given only in their signature" in capsys.readouterr().err
    assert (
        again["this_invocation"]["shards"] == 1 and again["shards_done"] == 2 and not again["failed_shards"]
    )
    assert again["n_in"] == first["n_in"] * 2

    run_files = [p for p in (tmp_path / "run").iterdir() if p.is_file()]
    assert len(run_files) >= 12 and not any(b"SIGNED-" in p.read_bytes() for p in run_files)
    rows = pq.read_table(tmp_path / "run" / names[0].replace(".tar", ".parquet")).column("shard").to_pylist()
    assert set(rows) == {f"{base}/{names[0]}"}
    assert json.loads((tmp_path / "run" / "manifest.json").read_text())["shards"] == [
        f"{base}/{n}" for n in names
    ]

    with pytest.raises(UserError, match="needs one now"):  # the run recorded no signature to read by
        reselect(out, str(tmp_path / "sel"), 0.0, new_run=True)
    shutil.copy(tiny_shards[2], served / "other.tar")
    with pytest.raises(UserError, match="did not clean"):
        reselect(out, str(tmp_path / "sel"), 0.0, new_run=True, shards=sign(["other.tar"], "SIGNED-C"))
    selected = reselect(out, str(tmp_path / "sel"), 0.0, new_run=True, shards=sign(names, "SIGNED-C"))
    assert selected["shards_done"] == 2 and selected["kept"] == again["n_in"] - sum(
        again["rejected"].values()
    )


def test_a_round_reads_the_web_caption_where_run_caption_from_says(tmp_path, tiny_models, tiny_shards):
    """The round's reader takes ``run.caption_from``: the web candidate is the ``caption`` member's text."""
    moved = tmp_path / "moved.tar"
    with tarfile.open(tiny_shards[1]) as src, tarfile.open(moved, "w") as dst:
        for member in src.getmembers():
            data = src.extractfile(member).read()
            member.name = member.name.replace(".txt", ".caption")
            dst.addfile(member, io.BytesIO(data))
    out = tmp_path / "run"
    cfg = tiny_cfg("run.caption_from=[caption]")
    summary = run_round(cfg, [str(moved)], str(out), *tiny_models, local=True, progress=False)
    assert summary["n_in"] == 10 and summary["no_web_caption"] == 0
    web = [
        [c["text"] for c in row["candidates"] if c["source"] == "web"]
        for row in pq.read_table(out / "moved.scores.parquet").to_pylist()
    ]
    captions = [s.caption for s in ShardReader(tiny_shards[1])]
    assert web == [[caption] for caption in captions]


def test_a_round_hands_its_workers_absolute_paths(tmp_path, tiny_models, tiny_shards, monkeypatch):
    """The workers of a running Ray (``ray start --head``, which a round joins by default, or ``--address``)
    work in the folder Ray was started in, not the driver's. Before, a relative ``-o`` and relative model
    folders went to them as typed: the models were "not a folder" there, and with absolute models the
    shards' outputs landed under Ray's folder (``/run/web-000000.tar``) while summary.json went to ``./run``."""
    from capfilt.run import round as round_module

    make_pool, handed = round_module.make_pool, {}

    def recorded(cfg, captioner, filter_, *args):
        pool = make_pool(cfg, captioner, filter_, *args)
        handed["models"], run = (captioner, filter_), pool.run

        def run_recorded(jobs, output, *more, **kw):
            handed["out"] = output.out
            return run(jobs, output, *more, **kw)

        pool.run = run_recorded
        return pool

    monkeypatch.setattr(round_module, "make_pool", recorded)
    monkeypatch.chdir(tmp_path)
    models = [os.path.relpath(m, tmp_path) for m in tiny_models]
    summary = run_round(tiny_cfg(), tiny_shards[1:2], "run", *models, local=True, progress=False)
    assert summary["shards_done"] == 1
    assert handed == {"models": tuple(tiny_models), "out": str(tmp_path / "run")}
