"""Input versions: what a rerun compares to tell an input shard that changed since it was cleaned."""

import os

from capfilt.data import versions


def test_versions_come_from_one_listing_and_a_gone_file_has_none(tmp_path):
    (tmp_path / "a").mkdir()
    for name in ("a/x.tar", "a/y.tar", "b.tar"):
        (tmp_path / name).write_bytes(b"0" * 1024)
    os.utime(tmp_path / "a/y.tar", (1_000_000_000, 1_000_000_000))
    urls = [str(tmp_path / n) for n in ("a/x.tar", "a/y.tar", "b.tar", "a/gone.tar")]
    now = versions.current_versions(urls)
    assert now[urls[1]] == {"size": "1024", "mtime": "1000000000.0"}
    assert now[urls[0]] == versions.version(urls[0]) and now[urls[3]] == {}
    assert now[urls[2]] == versions.version(urls[2])


def test_only_fields_both_versions_have_are_compared():
    was = {"size": "10", "ETag": '"abc"'}
    assert not versions.changed(was, {"size": "10", "ETag": '"abc"'})
    assert versions.changed(was, {"size": "10", "ETag": '"abd"'})  # same size, other bytes
    assert versions.changed(was, {"size": "11", "ETag": '"abc"'})
    assert not versions.changed(was, {})  # gone, or a store that says nothing: the outputs stay
    assert not versions.changed({}, {"size": "10"})  # recorded before versions were


def test_the_store_s_content_identity_wins_over_its_time():
    s3 = {"name": "b/k.tar", "size": 5, "ETag": '"e"', "LastModified": "2026-11-27"}
    assert versions.version_of(s3) == {"size": "5", "ETag": '"e"'}
    assert versions.version_of({"name": "d", "type": "directory"}) == {}
