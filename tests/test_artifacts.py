"""Artifacts on disk (moe_utils.common.artifacts): digests against hashlib on hand-built bytes, atomic
writes, checksummed folders that refuse every kind of damage with the folder's path, and the keyed
cache that recomputes what does not verify."""

from __future__ import annotations

import hashlib
import json
import logging

import pytest

from moe_utils.common import artifacts
from moe_utils.common.artifacts import ArtifactError, ArtifactMissing
from moe_utils.common.cache import KeyedCache
from moe_utils.common.fingerprint import dependency_key


# ----------------------------------------------------------------------------------- digests
def test_json_digest_is_the_sha256_of_canonical_json():
    text = '{"a": [1, 2], "b": "x"}'  # sorted keys, json.dumps' default separators
    assert artifacts.json_digest({"b": "x", "a": [1, 2]}) == hashlib.sha256(text.encode()).hexdigest()
    assert artifacts.json_digest({"p": artifacts}) == artifacts.json_digest({"p": str(artifacts)})  # default=str
    assert artifacts.json_digest({"a": 1}) != artifacts.json_digest({"a": 2})


def test_file_digest(tmp_path):
    (tmp_path / "a").write_bytes(b"abc")
    assert artifacts.sha256_file(tmp_path / "a") == hashlib.sha256(b"abc").hexdigest()


def test_package_versions_names_missing_packages():
    versions = artifacts.package_versions(("numpy", "no-such-package-xyz"))
    assert versions["numpy"] and versions["no-such-package-xyz"] is None


# ----------------------------------------------------------------------------- atomic writes
def test_a_failed_writer_leaves_the_old_file_and_no_temporary(tmp_path):
    path = tmp_path / "sub" / "f.bin"
    artifacts.atomic_write_bytes(path, b"old")

    def broken(tmp):
        with open(tmp, "wb") as handle:
            handle.write(b"half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        artifacts.atomic_write_with(path, broken)
    assert path.read_bytes() == b"old" and [p.name for p in path.parent.iterdir()] == ["f.bin"]
    artifacts.atomic_write_json(path, {"b": 1, "a": [1]})
    assert json.loads(path.read_text()) == {"a": [1], "b": 1}


# --------------------------------------------------------------------------- artifact folders
def _folder(tmp_path):
    path = tmp_path / "art"
    written = artifacts.write_artifact(path, {"a.bin": b"abc", "b.txt": lambda tmp: open(tmp, "w").write("hello")},
                                       {"format": "test/1", "note": "x"})
    return path, written


def test_write_and_read_an_artifact(tmp_path):
    path, written = _folder(tmp_path)
    assert written["files"] == {"a.bin": hashlib.sha256(b"abc").hexdigest(),
                                "b.txt": hashlib.sha256(b"hello").hexdigest()}
    manifest = artifacts.read_artifact(path, what="test artifact", fix="rerun", format="test/1",
                                       required=("a.bin", "b.txt"), exact=True)
    assert manifest == json.loads((path / "manifest.json").read_text()) and manifest["note"] == "x"


@pytest.mark.parametrize("damage, message", [
    (lambda p: (p / "a.bin").write_bytes(b"abd"), "checksum of a.bin does not match"),
    (lambda p: (p / "b.txt").unlink(), "b.txt is listed in the manifest but missing"),
    (lambda p: (p / "manifest.json").write_text("{not json"), "is not valid JSON"),
    (lambda p: (p / "manifest.json").write_text("[1]"), "holds a list, not an object"),
    (lambda p: _edit(p, format="other/1"), "format 'other/1' is not 'test/1'"),
    (lambda p: _edit(p, files={}), r"must list exactly \['a.bin', 'b.txt'\]"),
    (lambda p: _edit(p, files={"a.bin": 5, "b.txt": "0"}), "must list exactly"),
])
def test_every_damage_is_refused_with_the_folder_and_the_fix(tmp_path, damage, message):
    path, _ = _folder(tmp_path)
    damage(path)
    with pytest.raises(ArtifactError, match=message) as err:
        artifacts.read_artifact(path, what="test artifact", fix="re-run stage 9", format="test/1",
                                required=("a.bin", "b.txt"), exact=True)
    assert str(path) in str(err.value) and "re-run stage 9" in str(err.value)


def _edit(path, **changes):
    manifest = json.loads((path / "manifest.json").read_text())
    (path / "manifest.json").write_text(json.dumps({**manifest, **changes}))


def test_an_unfinished_folder_is_missing_not_damaged(tmp_path):
    path, _ = _folder(tmp_path)
    (path / "manifest.json").unlink()  # what a writer killed before its last step leaves
    with pytest.raises(ArtifactMissing, match="no test artifact at .*manifest.json is missing; run it") as err:
        artifacts.read_artifact(path, what="test artifact", fix="run it")
    assert isinstance(err.value, FileNotFoundError)


# -------------------------------------------------------------------------------- keyed cache
def test_keyed_cache_computes_once_per_key_and_recomputes_a_damaged_entry(tmp_path, caplog):
    calls = []

    def compute(value):
        calls.append(value)
        return value

    def get(key, value):
        return cache.get_or_compute(key, lambda: compute(value),
                                    lambda v: ({"v.json": json.dumps(v).encode()}, {"value": v}),
                                    lambda folder, manifest: json.loads((folder / "v.json").read_text()))

    cache = KeyedCache(tmp_path, "demo")
    assert get({"k": 1, "a": "x"}, 10) == (10, False)
    assert get({"a": "x", "k": 1}, 99) == (10, True)  # same key in another order: read, not computed
    assert get({"k": 2}, 20) == (20, False) and calls == [10, 20]
    entry = cache.entry({"k": 1, "a": "x"})
    full_key = dependency_key({"a": "x", "k": 1})  # the parameters, the package's code, the data, versions
    assert entry.name == f"demo-{artifacts.json_digest(full_key)}"
    assert json.loads((entry / "manifest.json").read_text())["key"] == json.loads(json.dumps(full_key))
    (entry / "v.json").write_text("11")
    with caplog.at_level(logging.WARNING):
        assert get({"k": 1, "a": "x"}, 12) == (12, False)
    assert "checksum of v.json" in caplog.text
    assert get({"k": 1, "a": "x"}, 13) == (12, True)


def test_a_cache_without_root_keeps_nothing():
    cache = KeyedCache(None, "demo")
    results = [cache.get_or_compute("k", lambda i=i: i, lambda v: ({}, {}), lambda *_: -1) for i in range(2)]
    assert results == [(0, False), (1, False)] and cache.load("k") is None
