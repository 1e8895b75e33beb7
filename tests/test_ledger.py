import json

import pytest

from capfilt.config import load_config
from capfilt.errors import UserError
from capfilt.run import ledger


def manifest(cfg, shards=("a/web-0.tar", "a/web-1.tar"), models=None):
    return ledger.make_manifest(list(shards), cfg, models or {"captioner": "c1", "filter": "f1"})


def test_same_run_continues_and_remembers_all_shards(tmp_path):
    cfg = load_config("tiny")
    ledger.open_run(str(tmp_path), manifest(cfg))
    ledger.open_run(str(tmp_path), manifest(cfg, shards=("a/web-2.tar",)))
    assert ledger.read_manifest(str(tmp_path))["shards"] == ["a/web-0.tar", "a/web-1.tar", "a/web-2.tar"]


def test_other_config_or_models_refuse_with_the_differences(tmp_path):
    cfg = load_config("tiny")
    ledger.open_run(str(tmp_path), manifest(cfg))
    with pytest.raises(ledger.RunMismatchError, match=r"config\.caption\.top_p: 0\.9 → 0\.5"):
        ledger.open_run(str(tmp_path), manifest(load_config("tiny", ["caption.top_p=0.5"])))
    with pytest.raises(ledger.RunMismatchError, match="models.filter"):
        ledger.open_run(str(tmp_path), manifest(cfg, models={"captioner": "c1", "filter": "f2"}))


def test_a_run_made_before_a_config_key_existed_continues_at_its_default(tmp_path):
    """A nightly rerun after upgrading capfilt: the old manifest lacks the keys added since, and the run
    behaved as their defaults do. Another value of such a key is still a difference."""
    cfg = load_config("tiny")
    ledger.open_run(str(tmp_path), manifest(cfg))
    path = tmp_path / ledger.MANIFEST
    old = json.loads(path.read_text())
    del old["config"]["finetune"]["freeze_vision"], old["config"]["run"]["shards_in_flight"]
    path.write_text(json.dumps(old))
    ledger.open_run(str(tmp_path), manifest(cfg, shards=("a/web-2.tar",)))
    assert len(ledger.read_manifest(str(tmp_path))["shards"]) == 3
    path.write_text(json.dumps(old))
    with pytest.raises(ledger.RunMismatchError, match=r"config\.run\.shards_in_flight: 1 → 2"):
        ledger.open_run(str(tmp_path), manifest(load_config("tiny", ["run.shards_in_flight=2"])))


def test_mistakes_about_the_run_folder_are_user_errors(tmp_path):
    """One line and exit 2 on the command line, not a traceback."""
    with pytest.raises(UserError, match="no manifest.json; not a capfilt run folder"):
        ledger.read_manifest(str(tmp_path))
    ledger.open_run(str(tmp_path), manifest(load_config("tiny")))
    with pytest.raises(UserError, match="seed"):
        ledger.open_run(str(tmp_path), manifest(load_config("tiny", ["run.seed=7"])))


def test_new_run_clears_the_previous_outputs(tmp_path):
    cfg = load_config("tiny")
    ledger.open_run(str(tmp_path), manifest(cfg))
    for f in ("web-0.tar", "web-0.done", "web-1.stats.json", "summary.json", "sizes.json", "notes.txt"):
        (tmp_path / f).write_text("x")
    names = ledger.shard_names(["a/web-0.tar", "a/web-1.tar"])
    assert ledger.pending_shards(str(tmp_path), names, list(names)) == ([("a/web-1.tar", "web-1")], [])
    new = manifest(load_config("tiny", ["run.seed=1"]))
    ledger.open_run(str(tmp_path), new, new_run=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["manifest.json", "notes.txt"]
    assert json.loads((tmp_path / "manifest.json").read_text())["seed"] == 1


def test_shard_names_stay_unique(tmp_path):
    names = ledger.shard_names(["a/web-0.tar", "b/web-0.tar"])
    assert len(set(names.values())) == 2


def test_a_grown_list_that_would_rename_an_old_shard_refuses(tmp_path):
    cfg = load_config("tiny")
    ledger.open_run(str(tmp_path), manifest(cfg))
    with pytest.raises(ledger.RunMismatchError, match="rename"):
        ledger.open_run(str(tmp_path), manifest(cfg, shards=("b/web-0.tar",)))
    assert ledger.read_manifest(str(tmp_path))["shards"] == ["a/web-0.tar", "a/web-1.tar"]


def test_a_run_that_lists_file_urls_keeps_their_spelling_when_continued(tmp_path):
    """A run made before capfilt kept one spelling per local file lists ``file://`` URLs; the same shards,
    now given as plain paths, are the run's shards (same output names), not new ones beside them."""
    cfg = load_config("tiny")
    ledger.open_run(str(tmp_path), manifest(cfg, shards=("file:///a/web-0.tar", "file:///a/web-1.tar")))
    ledger.open_run(str(tmp_path), manifest(cfg, shards=("/a/web-1.tar", "/a/web-2.tar")))
    urls = ledger.read_manifest(str(tmp_path))["shards"]
    assert urls == ["file:///a/web-0.tar", "file:///a/web-1.tar", "/a/web-2.tar"]
    assert list(ledger.shard_names(urls).values()) == ["web-0", "web-1", "web-2"]


def test_stale_temps_of_the_given_shards_are_removed_and_nothing_else(tmp_path):
    files = [
        ".web-1.tar.0123456789ab.tmp",  # a killed worker's tar
        ".web-1.scores.parquet.0123456789ab.tmp",
        ".web-2.tar.0123456789ab.tmp",  # another shard's, maybe being written
        ".manifest.json.0123456789ab.tmp",
        "web-1.tar",
        ".web-1.tar",  # not a writer's temp name
    ]
    for name in files:
        (tmp_path / name).write_bytes(b"x")
    removed = ledger.remove_stale_temps(str(tmp_path), ["web-1", "web-3"])
    assert sorted(p.rsplit("/", 1)[1] for p in removed) == sorted(files[:2])
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(files[2:])
    assert ledger.remove_stale_temps(str(tmp_path / "not-yet"), ["web-1"]) == []


def test_an_output_folder_that_holds_input_shards_refuses_however_spelled(tmp_path, monkeypatch):
    """Each shard's outputs are named after it, so writing into the inputs' folder replaced them."""
    (tmp_path / "in").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "in")
    shards = [str(tmp_path / "in" / "web-0.tar")]
    monkeypatch.chdir(tmp_path)
    for out in (str(tmp_path / "in"), "in/", f"file://{tmp_path}/in", "link", str(tmp_path / "in" / ".")):
        with pytest.raises(UserError, match="holds the input shards .*web-0.tar"):
            ledger.check_out_folder(out, shards)
    for out in (str(tmp_path / "out"), str(tmp_path), str(tmp_path / "in" / "sub"), "memory://in"):
        ledger.check_out_folder(out, shards)
    ledger.check_out_folder("s3://bucket/clean", ["s3://bucket/web/web-0.tar"])
    with pytest.raises(UserError):
        ledger.check_out_folder("s3://bucket/web/", ["s3://bucket/web/web-0.tar"])


def test_committed_shards_are_read_from_their_markers_whatever_their_names(tmp_path):
    """Markers are read in batches (fsspec's ``cat``, which would glob ``[``), a missing one is pending,
    and one without a version (an older run's, or not JSON) still commits its shard."""
    inputs = [tmp_path / n for n in ("web-0.tar", "web[1].tar", "web-2.tar", "web-3.tar")]
    for p in inputs:
        p.write_bytes(b"0" * 512)
    urls = [str(p) for p in inputs]
    names = ledger.shard_names(urls)
    out = tmp_path / "out"
    out.mkdir()
    now = ledger.versions.current_versions(urls)
    (out / "web-0.done").write_text(json.dumps({"input_version": now[urls[0]]}))
    (out / "web[1].done").write_text(json.dumps({"input_version": {**now[urls[1]], "size": "1"}}))
    (out / "web-3.done").write_text("x")
    assert ledger.committed(str(out), names) == {
        urls[0]: now[urls[0]],
        urls[1]: {**now[urls[1]], "size": "1"},
        urls[3]: {},
    }
    jobs, changed = ledger.pending_shards(str(out), names, urls)
    assert jobs == [(urls[1], "web[1]"), (urls[2], "web-2")] and changed == [urls[1]]
    with pytest.raises(FileNotFoundError, match="1 of 1 shards marked done have no stats.json"):
        list(ledger.read_stats(str(out), ["web-0"]))


def test_clearing_a_shard_leaves_a_shard_whose_name_starts_like_it(tmp_path):
    """``web`` and ``web.part2`` are two shards' names: clearing the first must not glob the second."""
    files = [f"{n}{e}" for n in ("web", "web.part2") for e in (".tar", ".parquet", ".stats.json", ".done")]
    for f in files:
        (tmp_path / f).write_text("x")
    ledger.clear_shard(str(tmp_path), "web")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(f for f in files if f.startswith("web.part2"))


def test_a_marker_that_cannot_be_read_is_an_error_not_an_uncommitted_shard(tmp_path):
    (tmp_path / "web-0.done").mkdir()  # an error other than a missing file
    with pytest.raises(IsADirectoryError):
        ledger.committed(str(tmp_path), {"in/web-0.tar": "web-0"})
