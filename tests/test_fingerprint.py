"""Content-addressed reuse: the key covers the weights, every package file, the data and the
parameters, for the pipeline's stages and for every cache alike (issue 26, cases 1 and 2)."""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import moe_utils
from moe_utils.common import fingerprint
from moe_utils.common.cache import KeyedCache
from moe_utils.models.loading import load_model
from moe_utils.capture.routing import capture_routing, model_identity, router_fingerprint
from moe_utils.capture.store import StoreError

from .conftest import TEXTS


def _bump(path, text: str) -> None:
    """Rewrite a file and move its mtime on, as an editor would."""
    path.write_text(text)
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))


def test_a_file_is_read_once_per_size_and_mtime(tmp_path, monkeypatch):
    monkeypatch.setenv(fingerprint.DIGEST_CACHE_ENV, str(tmp_path / "digests.json"))
    target = tmp_path / "weights.bin"
    target.write_bytes(b"abc")
    reads = []
    real = fingerprint.sha256_file
    monkeypatch.setattr(fingerprint, "sha256_file", lambda p: reads.append(p) or real(p))
    first = fingerprint.file_digest(target)
    assert fingerprint.file_digest(target) == first and len(reads) == 1
    fingerprint._digests.clear()  # a new process: the table on disk answers
    monkeypatch.setattr(fingerprint, "_loaded_from", None)
    assert fingerprint.file_digest(target) == first and len(reads) == 1
    _bump(target, "abd")
    assert fingerprint.file_digest(target) != first and len(reads) == 2


def test_the_package_digest_covers_task_yamls_and_data_files(tmp_path, monkeypatch):
    package = tmp_path / "pkg"
    (package / "tasks").mkdir(parents=True)
    (package / "module.py").write_text("x = 1\n")
    (package / "tasks" / "task.yaml").write_text("task: a\n")
    (package / "data.json").write_text("{}")
    (package / "__pycache__").mkdir()
    monkeypatch.setattr(fingerprint, "PACKAGE", package)
    before = fingerprint.package_digest()
    (package / "__pycache__" / "module.pyc").write_bytes(b"\0")  # byte-code is no dependency
    assert fingerprint.package_digest() == before
    _bump(package / "tasks" / "task.yaml", "task: b\n")
    after_yaml = fingerprint.package_digest()
    assert after_yaml != before
    _bump(package / "data.json", '{"a": 1}')
    assert fingerprint.package_digest() != after_yaml


def test_the_real_package_digest_lists_its_task_definitions():
    """The whole package, subpackages and their data files included."""
    assert fingerprint.PACKAGE == Path(moe_utils.__file__).resolve().parent
    listed = {p.relative_to(fingerprint.PACKAGE).as_posix() for p in fingerprint._listed(fingerprint.PACKAGE)}
    assert {"evaluation/tasks/blimp.yaml", "evaluation/tasks/mmlu_pro_mc.yaml", "evaluation/harness.py",
            "compression/methods/caep.py", "stages/explorer.js", "__init__.py"} <= listed
    assert not any(name.endswith(".pyc") for name in listed)


def test_data_digest_follows_the_files_the_variables_name(tmp_path, monkeypatch):
    (tmp_path / "test.txt").write_text("one")
    monkeypatch.setenv("MOE_WIKITEXT_DIR", str(tmp_path))
    before = fingerprint.data_digest()
    _bump(tmp_path / "test.txt", "two")
    assert fingerprint.data_digest()["MOE_WIKITEXT_DIR"] != before["MOE_WIKITEXT_DIR"]


@pytest.fixture()
def checkpoint(olmoe, tmp_path):
    """A local checkpoint of the tiny OLMoE model (weights, config, tokenizer)."""
    model, tokenizer = olmoe
    path = tmp_path / "ckpt"
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def _change_an_expert_in_place(path) -> None:
    """Scale one expert weight of the checkpoint, routers untouched (a fine-tune with frozen routers)."""
    tensors = load_file(path / "model.safetensors")
    name = next(k for k in tensors if "experts" in k and "layers.0." in k)
    tensors[name] = tensors[name] * 3.0
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    stat = (path / "model.safetensors").stat()
    os.utime(path / "model.safetensors", ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))


def test_a_checkpoint_changed_in_place_is_a_different_model(checkpoint, tmp_path):
    model, tokenizer = load_model(str(checkpoint), device="cpu")
    identity, routers = model_identity(model), router_fingerprint(model)
    store = capture_routing(model, tokenizer, TEXTS, out_dir=tmp_path / "store", progress=False)
    _change_an_expert_in_place(checkpoint)
    changed, _ = load_model(str(checkpoint), device="cpu")
    assert router_fingerprint(changed) == routers  # what the old keys looked at did not change ...
    assert model_identity(changed) != identity  # ... but the weights' digest did
    with pytest.raises(StoreError, match="holds a capture of other inputs or another model"):
        capture_routing(changed, tokenizer, TEXTS, out_dir=tmp_path / "store", progress=False)
    fresh = capture_routing(changed, tokenizer, TEXTS, out_dir=tmp_path / "store", overwrite=True, progress=False)
    assert fresh.manifest["fingerprint"] != store.manifest["fingerprint"]


def test_a_stage_key_covers_the_weights_and_the_package_files(checkpoint, tmp_path, monkeypatch):
    from moe_utils.pipeline.profiles import Stage
    from moe_utils.pipeline.runner import stage_fingerprint

    notebook = tmp_path / "01_stage.py"
    notebook.write_text("x = 1\n")
    stage = Stage("01_stage", notebook, {"model": "embedded"})
    key = lambda: stage_fingerprint(stage, {"model": str(checkpoint)}, "")  # noqa: E731
    before = key()
    _change_an_expert_in_place(checkpoint)
    after_weights = key()
    assert after_weights != before
    package = tmp_path / "pkg"
    (package / "tasks").mkdir(parents=True)
    (package / "tasks" / "t.yaml").write_text("a: 1\n")
    monkeypatch.setattr(fingerprint, "PACKAGE", package)
    with_package = key()
    _bump(package / "tasks" / "t.yaml", "a: 2\n")
    assert key() != with_package


def test_every_keyed_cache_misses_when_the_code_or_data_change(tmp_path, monkeypatch):
    cache = KeyedCache(tmp_path, "demo")
    calls = []
    compute = lambda: calls.append(1) or 1.0  # noqa: E731
    codec = (lambda v: ({"v": repr(v).encode()}, {}), lambda folder, _m: float((folder / "v").read_text()))
    assert cache.get_or_compute({"x": 1}, compute, *codec) == (1.0, False)
    assert cache.get_or_compute({"x": 1}, compute, *codec) == (1.0, True)
    monkeypatch.setattr(fingerprint, "package_digest", lambda: "edited code")
    assert cache.get_or_compute({"x": 1}, compute, *codec) == (1.0, False)
    monkeypatch.setenv("MOE_BLIMP_DIR", str(tmp_path))
    assert cache.get_or_compute({"x": 1}, compute, *codec) == (1.0, False)
    assert len(calls) == 3


def test_fresh_since_recomputes_older_entries_and_reuses_newer_ones(tmp_path, monkeypatch):
    cache = KeyedCache(tmp_path, "demo")
    calls = []
    compute = lambda: calls.append(1) or len(calls)  # noqa: E731
    codec = (lambda v: ({"v": str(v).encode()}, {}), lambda folder, _m: int((folder / "v").read_text()))
    assert cache.get_or_compute("k", compute, *codec) == (1, False)
    time.sleep(0.05)
    monkeypatch.setenv(fingerprint.FRESH_ENV, repr(time.time()))
    time.sleep(0.05)
    assert cache.get_or_compute("k", compute, *codec) == (2, False)  # --force: written before, recomputed
    assert cache.get_or_compute("k", compute, *codec) == (2, True)  # written in this run: reused


def test_a_capture_is_redone_under_fresh_since(olmoe, tmp_path, monkeypatch):
    model, tokenizer = olmoe
    store = capture_routing(model, tokenizer, TEXTS[:3], out_dir=tmp_path / "s", progress=False)
    written = (tmp_path / "s" / "manifest.json").stat().st_mtime_ns
    assert capture_routing(model, tokenizer, TEXTS[:3], out_dir=tmp_path / "s", progress=False).manifest == \
        store.manifest
    assert (tmp_path / "s" / "manifest.json").stat().st_mtime_ns == written  # reused
    time.sleep(0.05)
    monkeypatch.setenv(fingerprint.FRESH_ENV, repr(time.time()))
    again = capture_routing(model, tokenizer, TEXTS[:3], out_dir=tmp_path / "s", progress=False)
    assert (tmp_path / "s" / "manifest.json").stat().st_mtime_ns > written  # captured again
    np.testing.assert_array_equal(again.topk_indices, store.topk_indices)


def test_a_random_model_in_memory_is_keyed_by_its_tensors(olmoe):
    model, _ = olmoe
    before = fingerprint.loaded_model_digest(model)
    expert = next(p for n, p in model.named_parameters() if "experts" in n)
    with torch.no_grad():
        expert.mul_(2.0)
    try:
        assert fingerprint.loaded_model_digest(model) != before
    finally:
        with torch.no_grad():
            expert.div_(2.0)
    assert fingerprint.loaded_model_digest(model) == before
