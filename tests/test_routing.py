"""Routing capture and the store, checked against the models' own router outputs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from moe_utils.common import artifacts
from moe_utils.capture import routing
from moe_utils.models.loading import moe_layers
from moe_utils.capture.routing import capture_routing, record_routing
from moe_utils.capture.store import RoutingStore, StoreError

from .conftest import ARCHITECTURES, TEXTS


def _selection_from_logits(model, logits: torch.Tensor, layer) -> torch.Tensor:
    """Top-k chosen from the logits that transformers itself records (output_router_logits)."""
    k = layer.top_k
    if model.config.model_type == "deepseek_v3":  # sigmoid scores + correction bias, group-limited
        router = layer.router
        scores = logits.float().sigmoid() + router.e_score_correction_bias
        grouped = scores.view(-1, router.num_group, layer.num_experts // router.num_group)
        best_groups = grouped.topk(2, dim=-1)[0].sum(-1).topk(router.topk_group, dim=-1)[1]
        keep = torch.zeros_like(grouped[..., 0]).scatter_(1, best_groups, 1).bool()
        scores = scores.masked_fill(~keep.repeat_interleave(grouped.shape[-1], dim=1), float("-inf"))
        return scores.topk(k, dim=-1)[1]
    return logits.topk(k, dim=-1)[1]


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_capture_equals_the_routers_own_selection(random_models, arch, tmp_path):
    model, tok = random_models[arch]
    layers = moe_layers(model)
    for layer in layers:  # a non-zero correction bias, so that choice and weights differ (deepseek_v3)
        if hasattr(layer.router, "e_score_correction_bias"):
            layer.router.e_score_correction_bias.copy_(torch.linspace(-0.3, 0.3, layer.num_experts))
    store = capture_routing(model, tok, TEXTS, out_dir=tmp_path / arch, batch_size=3, progress=False)
    assert store.topk_indices.shape[1:] == (len(layers), layers[0].top_k)
    for sample_id, text in enumerate(TEXTS):  # one text at a time: no padding at all
        enc = tok(text, return_tensors="pt")
        with torch.no_grad():
            out = model(**enc, output_router_logits=True)
        rows = store.tokens.index[store.tokens.sample_id == sample_id]
        assert len(rows) == enc["input_ids"].shape[1]  # every real token, no padding
        assert (store.tokens.token_id[rows].to_numpy() == enc["input_ids"][0].numpy()).all()
        logits = out.router_logits if isinstance(out.router_logits, (tuple, list)) else [out.router_logits]
        assert len(logits) == len(layers)
        for layer, layer_logits in zip(layers, logits):
            expected = np.sort(_selection_from_logits(model, layer_logits, layer).numpy(), axis=1)
            captured = np.sort(store.topk_indices[rows, layer.index, :], axis=1)
            np.testing.assert_array_equal(captured, expected)


def test_weights_are_what_the_model_used(olmoe, tmp_path):
    """OLMoE without renormalisation: top-k weights equal the softmax probabilities of the chosen experts."""
    model, tok = olmoe
    store = capture_routing(model, tok, TEXTS, out_dir=tmp_path / "s", batch_size=2, record_probs=True,
                            progress=False)
    chosen = np.take_along_axis(np.asarray(store.probs, dtype=np.float32), store.topk_indices.astype(np.int64), 2)
    np.testing.assert_allclose(store.topk_weights, chosen, atol=2e-3)  # probs are stored as float16
    np.testing.assert_allclose(np.asarray(store.probs, np.float32).sum(-1), 1.0, atol=1e-2)


def test_padding_never_changes_the_capture(olmoe, tmp_path):
    model, tok = olmoe
    batched = capture_routing(model, tok, TEXTS, out_dir=tmp_path / "b", batch_size=len(TEXTS), progress=False)
    single = capture_routing(model, tok, TEXTS, out_dir=tmp_path / "one", batch_size=1, progress=False)
    lengths = [len(tok(t)["input_ids"]) for t in TEXTS]
    assert batched.n_tokens == sum(lengths)
    np.testing.assert_array_equal(batched.tokens.position, np.concatenate([np.arange(n) for n in lengths]))
    np.testing.assert_array_equal(batched.topk_indices, single.topk_indices)
    np.testing.assert_allclose(batched.topk_weights, single.topk_weights, atol=1e-5)


def test_left_padding_positions(olmoe, tmp_path):
    model, tok = olmoe
    tok.padding_side = "left"
    try:
        left = capture_routing(model, tok, TEXTS, out_dir=tmp_path / "l", batch_size=4, progress=False)
    finally:
        tok.padding_side = "right"
    right = capture_routing(model, tok, TEXTS, out_dir=tmp_path / "r", batch_size=4, progress=False)
    np.testing.assert_array_equal(left.tokens.position, right.tokens.position)
    np.testing.assert_array_equal(left.tokens.token_id, right.tokens.token_id)


def test_hooks_are_removed_even_on_error(olmoe):
    model, _ = olmoe
    before = [len(layer.router._forward_hooks) for layer in moe_layers(model)]  # transformers' own recorders
    with pytest.raises(RuntimeError, match="boom"):
        with record_routing(model):
            assert [len(layer.router._forward_hooks) for layer in moe_layers(model)] == [n + 1 for n in before]
            raise RuntimeError("boom")
    assert [len(layer.router._forward_hooks) for layer in moe_layers(model)] == before


def test_same_inputs_give_identical_stores(olmoe, tmp_path):
    model, tok = olmoe
    a = capture_routing(model, tok, TEXTS, out_dir=tmp_path / "a", labels=list("abcdefg"), progress=False)
    b = capture_routing(model, tok, TEXTS, out_dir=tmp_path / "b", labels=list("abcdefg"), progress=False)
    assert a.manifest["files"] == b.manifest["files"]  # byte-identical arrays and token table
    assert list(a.tokens.columns) == ["sample_id", "position", "token_id", "token", "label"]
    assert set(a.tokens.label) == set("abcdefg")


def test_finished_capture_is_reused_and_other_inputs_refused(olmoe, tmp_path, monkeypatch):
    model, tok = olmoe
    first = capture_routing(model, tok, TEXTS, out_dir=tmp_path / "s", progress=False)
    monkeypatch.setattr(routing, "_capture_batch", lambda *a, **k: pytest.fail("recomputed a finished capture"))
    again = capture_routing(model, tok, TEXTS, out_dir=tmp_path / "s", progress=False)
    assert again.manifest["files"] == first.manifest["files"]
    with pytest.raises(StoreError, match="overwrite=True"):
        capture_routing(model, tok, TEXTS[:3], out_dir=tmp_path / "s", progress=False)


def test_interrupted_capture_resumes(olmoe, tmp_path, monkeypatch):
    model, tok = olmoe
    reference = capture_routing(model, tok, TEXTS, out_dir=tmp_path / "ref", batch_size=2, progress=False)
    real_batch, calls = routing._capture_batch, []

    def crash_on_third(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real_batch(*args, **kwargs)

    monkeypatch.setattr(routing, "_capture_batch", crash_on_third)
    with pytest.raises(KeyboardInterrupt):
        capture_routing(model, tok, TEXTS, out_dir=tmp_path / "s", batch_size=2, progress=False)
    with pytest.raises(StoreError, match="did not finish"):
        RoutingStore.open(tmp_path / "s")  # nothing half-written is trusted
    calls.clear()
    monkeypatch.setattr(routing, "_capture_batch", lambda *a, **k: (calls.append(1), real_batch(*a, **k))[1])
    resumed = capture_routing(model, tok, TEXTS, out_dir=tmp_path / "s", batch_size=2, progress=False)
    assert len(calls) == 2  # 4 batches, 2 done before the interruption
    assert resumed.manifest["files"] == reference.manifest["files"]
    assert not (tmp_path / "s" / ".partial").exists()


def test_corrupted_store_is_refused(olmoe, tmp_path):
    model, tok = olmoe
    capture_routing(model, tok, TEXTS, out_dir=tmp_path / "s", progress=False)
    path = tmp_path / "s" / "topk_indices.npy"
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(StoreError, match="checksum of topk_indices.npy"):
        RoutingStore.open(tmp_path / "s")
    (tmp_path / "s" / "tokens.parquet").unlink()
    with pytest.raises(StoreError, match="missing"):
        RoutingStore.open(tmp_path / "s", verify=False)


def test_a_damaged_store_is_repaired_by_capturing_again(olmoe, tmp_path):
    model, tok = olmoe
    reference = capture_routing(model, tok, TEXTS, out_dir=tmp_path / "s", progress=False)
    (tmp_path / "s" / "tokens.parquet").unlink()  # same inputs, damaged store: the error said "re-run"
    repaired = capture_routing(model, tok, TEXTS, out_dir=tmp_path / "s", progress=False)
    assert repaired.manifest["files"] == reference.manifest["files"]


def test_a_truncated_chunk_of_an_unfinished_capture_is_captured_again(olmoe, tmp_path, monkeypatch):
    model, tok = olmoe
    reference = capture_routing(model, tok, TEXTS, out_dir=tmp_path / "ref", batch_size=2, progress=False)
    monkeypatch.setattr(routing, "write_store", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):
        capture_routing(model, tok, TEXTS, out_dir=tmp_path / "s", batch_size=2, progress=False)
    monkeypatch.undo()
    chunk = tmp_path / "s" / ".partial" / "chunk-000001.npz"
    chunk.write_bytes(chunk.read_bytes()[:40])
    resumed = capture_routing(model, tok, TEXTS, out_dir=tmp_path / "s", batch_size=2, progress=False)
    assert resumed.manifest["files"] == reference.manifest["files"]


def test_partial_chunks_are_written_under_names_unique_to_each_writer(olmoe, tmp_path, monkeypatch):
    model, tok = olmoe
    seen = []
    real_replace = artifacts.os.replace  # every atomic write of the package goes through moe_utils.common.artifacts
    monkeypatch.setattr(artifacts.os, "replace", lambda a, b: (seen.append(Path(a).name), real_replace(a, b))[1])
    capture_routing(model, tok, TEXTS, out_dir=tmp_path / "s", batch_size=2, progress=False)
    temporary = [name for name in seen if name.startswith(".chunk-")]
    assert len(temporary) == 4 and len(set(temporary)) == 4
    assert all(name != ".chunk-000000.tmp.npz" for name in temporary)  # not one fixed name for every process


def _edit_manifest(path, edit):
    manifest = json.loads((path / "manifest.json").read_text())
    (path / "manifest.json").write_text(edit(manifest) if callable(edit) else edit)


@pytest.mark.parametrize("edit, message", [
    (lambda m: json.dumps({**m, "model": {**m["model"], "n_experts": 2}}), "beyond the manifest's n_experts"),
    (lambda m: json.dumps({**m, "model": {**m["model"], "n_layers": 1}}), "manifest says 1 MoE layers"),
    (lambda m: json.dumps({**m, "files": {}}), "files must list"),
    (lambda m: json.dumps([m]), "holds a list, not an object"),
    ("{not json", "is not valid JSON"),
])
def test_an_edited_manifest_is_refused_with_its_path(olmoe, tmp_path, edit, message):
    model, tok = olmoe
    capture_routing(model, tok, TEXTS, out_dir=tmp_path / "s", progress=False)
    _edit_manifest(tmp_path / "s", edit)
    with pytest.raises(StoreError, match=message) as err:
        RoutingStore.open(tmp_path / "s")
    assert str(tmp_path / "s") in str(err.value)


def test_shards_read_as_one_store(olmoe, tmp_path):
    model, tok = olmoe
    whole = capture_routing(model, tok, TEXTS, out_dir=tmp_path / "whole", labels=list("abcdefg"), batch_size=2,
                            progress=False)
    with pytest.raises(StoreError, match=r"shards \[1\] of 2 are missing"):
        capture_routing(model, tok, TEXTS, out_dir=tmp_path / "sh", labels=list("abcdefg"), batch_size=2,
                        shard=(0, 2), progress=False)
        RoutingStore.open(tmp_path / "sh")
    capture_routing(model, tok, TEXTS, out_dir=tmp_path / "sh", labels=list("abcdefg"), batch_size=2,
                    shard=(1, 2), progress=False)
    merged = RoutingStore.open(tmp_path / "sh")
    np.testing.assert_array_equal(merged.topk_indices, whole.topk_indices)
    np.testing.assert_array_equal(merged.topk_weights, whole.topk_weights)
    assert merged.tokens.equals(whole.tokens)
    with pytest.raises(ValueError, match="rank"):
        capture_routing(model, tok, TEXTS, out_dir=tmp_path / "bad", shard=(2, 2), progress=False)


def test_manifest_describes_the_capture(olmoe, tmp_path):
    model, tok = olmoe
    store = capture_routing(model, tok, TEXTS, out_dir=tmp_path / "s", data_spec={"dataset": "unit"},
                            max_length=5, progress=False)
    manifest = json.loads((tmp_path / "s" / "manifest.json").read_text())
    assert manifest["model"]["model_type"] == "olmoe" and manifest["model"]["n_experts"] == 8
    assert manifest["data"] == {"dataset": "unit"} and manifest["parameters"]["max_length"] == 5
    assert manifest["versions"]["torch"] == torch.__version__.split("+")[0] or manifest["versions"]["torch"]
    assert store.tokens.groupby("sample_id").size().max() == 5  # truncation
    assert store.topk_indices.dtype == np.uint8  # at most 2 bytes per (token, layer, k) slot
