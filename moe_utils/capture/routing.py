"""Routing capture: record which experts every real token is sent to, in every MoE layer.

This is the paper's first step (section 1, "expert activation collection"): run the model on
prompts and record the routing allocation alpha(t, layer, expert). Forward hooks sit on the router
modules found by :func:`moe_utils.models.loading.moe_layers` (the router picks the top-k itself in
transformers 5, so its output *is* the selection the model uses). Hooks are installed by a context
manager and always removed. Padding positions are dropped with the attention mask.

Work is written batch by batch into ``<out_dir>/.partial/`` (each chunk atomically), so an
interrupted capture resumes where it stopped; the finished store is assembled and its manifest
written last (see :mod:`moe_utils.capture.store`).
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import json
import logging
import shutil
import zipfile
from functools import partial as partial_write
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from moe_utils.common.artifacts import atomic_write_json, atomic_write_with, json_digest, package_versions
from moe_utils.common.fingerprint import dependency_key, is_stale, loaded_model_digest
from moe_utils.models.loading import MoELayer, NonFiniteError, RouterOutput, model_summary, moe_layers
from moe_utils.capture.store import MANIFEST, RoutingStore, StoreError, index_dtype, write_store

log = logging.getLogger(__name__)
PARTIAL = ".partial"


class RoutingRecorder:
    """Collects router outputs during forward passes; :meth:`pop` returns and clears them per layer."""

    def __init__(self, layers: list[MoELayer]):
        self.layers = layers
        self.outputs: dict[int, list[RouterOutput]] = {layer.index: [] for layer in layers}

    def hook_for(self, layer: MoELayer):
        read = layer.architecture.read_router_output

        def hook(_module, _inputs, output):
            self.outputs[layer.index].append(read(output))

        return hook

    def pop(self) -> list[RouterOutput]:
        """One :class:`RouterOutput` per MoE layer for the last forward pass."""
        result = []
        for layer in self.layers:
            calls = self.outputs[layer.index]
            if len(calls) != 1:
                raise RuntimeError(
                    f"router of MoE layer {layer.index} ran {len(calls)} times in one forward pass; "
                    "capture expects exactly one call per layer"
                )
            result.append(calls[0])
            calls.clear()
        return result


@contextlib.contextmanager
def record_routing(model: torch.nn.Module, layers: list[MoELayer] | None = None) -> Iterator[RoutingRecorder]:
    """Hook every MoE router of ``model`` (its ``layers``, found when not given) for the duration of
    the ``with`` block."""
    layers = moe_layers(model) if layers is None else layers
    recorder = RoutingRecorder(layers)
    handles = [layer.router.register_forward_hook(recorder.hook_for(layer)) for layer in layers]
    try:
        yield recorder
    finally:
        for handle in handles:
            handle.remove()


def check_finite_routing(outputs: Sequence[RouterOutput], layers: Sequence[MoELayer]) -> None:
    """Raise :class:`NonFiniteError` naming the first MoE layer whose router gave a NaN or infinite
    logit or weight: a capture of such a model would record meaningless routing as a success."""
    for output, layer in zip(outputs, layers):
        for what, tensor in (("routing weights", output.weights), ("router logits", output.logits)):
            if tensor is not None and not bool(torch.isfinite(tensor).all()):
                raise NonFiniteError(f"MoE layer {layer.index} (decoder layer {layer.layer_index}): the router gave non-finite {what} "
                                     "(NaN or inf); the model's weights are broken, check the checkpoint")


def routing_probabilities(output: RouterOutput, scoring: str) -> torch.Tensor:
    """Full routing probabilities over all experts, from the router's logits."""
    if output.logits is None:
        raise ValueError("this architecture's adapter gives no router logits: record_probs=False is required")
    logits = output.logits.float()
    return torch.sigmoid(logits) if scoring == "sigmoid" else torch.softmax(logits, dim=-1)


def router_fingerprint(model: torch.nn.Module, layers: list[MoELayer] | None = None) -> str:
    """sha256 over the routers' weights: identifies the routing function a capture came from."""
    digest = hashlib.sha256()
    for layer in moe_layers(model) if layers is None else layers:
        for tensor in layer.router.state_dict().values():
            digest.update(tensor.detach().float().cpu().numpy().tobytes())
    return digest.hexdigest()


def model_identity(model: torch.nn.Module, layers: list[MoELayer] | None = None) -> dict:
    """What identifies a model's captures, calibrations and evaluations in a cache: name, revision,
    its weights (:func:`moe_utils.common.fingerprint.loaded_model_digest`: the checkpoint files' digest),
    the routers' weights in memory (:func:`router_fingerprint`) and the parameter count."""
    return {"name": str(getattr(model, "name_or_path", "")), "revision": getattr(model.config, "_commit_hash", None),
            "weights": loaded_model_digest(model), "routers": router_fingerprint(model, layers),
            "n_parameters": sum(p.numel() for p in model.parameters())}


def _texts_fingerprint(texts: Sequence[str], labels: Sequence[str] | None) -> str:
    payload = json.dumps([list(texts), None if labels is None else list(labels)]).encode()
    return hashlib.sha256(payload).hexdigest()


def _save_chunk(path: str, chunk: dict) -> None:
    with open(path, "wb") as handle:  # a file handle: np.savez would append ".npz" to a bare name
        np.savez(handle, **chunk)


def _chunk_is_readable(path: Path) -> bool:
    """True when a partial-capture chunk opens and every array in it reads back whole."""
    try:
        with np.load(path) as chunk:
            for name in chunk.files:
                chunk[name]
        return True
    except (OSError, ValueError, EOFError, zipfile.BadZipFile):
        return False


def _shard_positions(n: int, shard: tuple[int, int] | None) -> np.ndarray:
    if shard is None:
        return np.arange(n)
    rank, world = shard
    if not (isinstance(rank, int) and isinstance(world, int) and 0 <= rank < world):
        raise ValueError(f"shard must be (rank, world_size) with 0 <= rank < world_size, got {shard}")
    return np.array_split(np.arange(n), world)[rank]


def forward_kwargs(model: torch.nn.Module) -> dict:
    """Skip the LM head where the model allows it: capture needs the routers, not the logits."""
    if "logits_to_keep" in inspect.signature(model.forward).parameters:
        return {"logits_to_keep": 1}
    return {}


def _capture_batch(model, tokenizer, texts, sample_ids, *, max_length, record_probs, recorder, device, kwargs):
    enc = tokenizer(list(texts), return_tensors="pt", padding=True, truncation=True, max_length=max_length)
    mask = enc["attention_mask"].bool()  # (B, T)
    model(input_ids=enc["input_ids"].to(device), attention_mask=enc["attention_mask"].to(device),
          use_cache=False, **kwargs)
    outputs = recorder.pop()
    check_finite_routing(outputs, recorder.layers)
    batch, length = mask.shape
    dev = outputs[0].indices.device  # layers may sit on several devices (device_map="auto")
    keep = mask.reshape(-1).nonzero().squeeze(1).to(dev)  # real tokens, in (batch, position) order

    def gather(per_layer: list[torch.Tensor]) -> torch.Tensor:  # -> (n_real, n_layers, ...)
        stacked = torch.stack([t.reshape(batch * length, -1).to(dev) for t in per_layer], dim=1)
        return stacked.index_select(0, keep).cpu()

    chunk = {"topk_indices": gather([o.indices for o in outputs]).numpy(),
             "topk_weights": gather([o.weights.float() for o in outputs]).numpy()}
    if record_probs:
        probs = [routing_probabilities(o, recorder.layers[i].architecture.scoring) for i, o in enumerate(outputs)]
        chunk["probs"] = gather(probs).numpy().astype(np.float16)
    positions = torch.arange(length).expand(batch, length)
    if tokenizer.padding_side == "left":
        positions = (mask.long().cumsum(dim=1) - 1).clamp(min=0)
    chunk["sample_id"] = np.repeat(np.asarray(sample_ids), mask.sum(dim=1).numpy())
    chunk["position"] = positions[mask].numpy()
    chunk["token_id"] = enc["input_ids"][mask].numpy()
    return chunk


def capture_routing(
    model: torch.nn.Module,
    tokenizer,
    texts: Sequence[str],
    *,
    out_dir: str | Path,
    labels: Sequence[str] | None = None,
    batch_size: int = 8,
    max_length: int = 512,
    record_probs: bool = False,
    shard: tuple[int, int] | None = None,
    data_spec: dict | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> RoutingStore:
    """Run ``model`` over ``texts`` and store, per real token and MoE layer, the routing it chose.

    Args:
        texts: the prompts; ``sample_id`` in the token table is the index of a text in this list.
        out_dir: the store directory (see :mod:`moe_utils.capture.store`). If it already holds a finished
            capture of the same model and inputs, that store is returned without recomputation;
            an unfinished one is resumed; one of different inputs is an error, unless ``overwrite``
            (then it is replaced).
        labels: one label per text (e.g. its MMLU-Pro category), copied into the token table.
        batch_size, max_length: tokenisation and batching (longer texts are truncated).
        record_probs: also store full routing probabilities (n_tokens, n_layers, E) as float16.
        shard: ``(rank, world_size)``: capture only this process's contiguous share of ``texts``
            into ``out_dir/shard-<rank>-of-<world>``; :meth:`RoutingStore.open` on ``out_dir``
            reads all shards as one store (for ``torchrun`` / ``accelerate launch``).
        data_spec: how the texts were chosen (dataset, categories, seed ...), kept in the manifest.
    """
    if labels is not None and len(labels) != len(texts):
        raise ValueError(f"labels has {len(labels)} entries for {len(texts)} texts")
    if len(texts) == 0:
        raise ValueError("no texts to capture")
    out_dir = Path(out_dir)
    positions = _shard_positions(len(texts), shard)
    if shard is not None:
        out_dir = out_dir / f"shard-{shard[0]:05d}-of-{shard[1]:05d}"
    layers = moe_layers(model)
    summary = model_summary(model, layers)
    fingerprint = {
        "model": router_fingerprint(model, layers),
        "texts": _texts_fingerprint(texts, labels),
        "positions": hashlib.sha256(positions.tobytes()).hexdigest(),
        "max_length": max_length,
        "batch_size": batch_size,
        "record_probs": record_probs,
        "dependencies": json_digest(dependency_key(model_identity(model, layers))),
    }
    if (out_dir / MANIFEST).is_file():
        try:
            existing = RoutingStore.open(out_dir)
        except StoreError as err:  # damaged: nothing in it can be trusted, so capture again
            log.warning("replacing the damaged store in %s (%s)", out_dir, err)
            shutil.rmtree(out_dir)
        else:
            if existing.manifest.get("fingerprint") == fingerprint and not is_stale(out_dir / MANIFEST):
                log.info("reusing the finished capture in %s", out_dir)
                return existing
            if existing.manifest.get("fingerprint") == fingerprint:  # --force: the same inputs, captured again
                overwrite = True
    if (out_dir / MANIFEST).is_file():
        if not overwrite:
            raise StoreError(
                f"{out_dir} holds a capture of other inputs or another model; choose another out_dir "
                "or pass overwrite=True to replace it"
            )
        shutil.rmtree(out_dir)
    partial = out_dir / PARTIAL
    spec_path = partial / "fingerprint.json"
    if partial.is_dir() and (not spec_path.is_file() or json.loads(spec_path.read_text()) != fingerprint
                             or is_stale(spec_path)):
        log.warning("discarding an unfinished capture of other inputs (or older than --force) in %s", partial)
        shutil.rmtree(partial)
    partial.mkdir(parents=True, exist_ok=True)
    atomic_write_json(spec_path, fingerprint)

    device = next(model.parameters()).device
    kwargs = forward_kwargs(model)
    batches = [positions[i : i + batch_size] for i in range(0, len(positions), batch_size)]
    for b in range(len(batches)):  # a chunk cut short (a killed writer, a full disk) is captured again
        chunk_path = partial / f"chunk-{b:06d}.npz"
        if chunk_path.is_file() and not _chunk_is_readable(chunk_path):
            log.warning("capturing batch %d again: %s is damaged", b, chunk_path)
            chunk_path.unlink()
    done = sum((partial / f"chunk-{b:06d}.npz").is_file() for b in range(len(batches)))
    if done:
        log.info("resuming capture in %s: %d of %d batches already done", out_dir, done, len(batches))
    with torch.no_grad(), record_routing(model, layers) as recorder:
        for b, sample_ids in enumerate(tqdm(batches, desc="capturing routing", disable=not progress)):
            chunk_path = partial / f"chunk-{b:06d}.npz"
            if chunk_path.is_file():
                continue
            chunk = _capture_batch(
                model, tokenizer, [texts[i] for i in sample_ids], sample_ids, max_length=max_length,
                record_probs=record_probs, recorder=recorder, device=device, kwargs=kwargs,
            )
            atomic_write_with(chunk_path, partial_write(_save_chunk, chunk=chunk))

    chunks = [np.load(partial / f"chunk-{b:06d}.npz") for b in range(len(batches))]
    arrays = {"topk_indices": np.concatenate([c["topk_indices"] for c in chunks]).astype(
        index_dtype(summary["n_experts"]))}
    arrays["topk_weights"] = np.concatenate([c["topk_weights"] for c in chunks]).astype(np.float32)
    if record_probs:
        arrays["probs"] = np.concatenate([c["probs"] for c in chunks])
    token_ids = np.concatenate([c["token_id"] for c in chunks])
    sample_col = np.concatenate([c["sample_id"] for c in chunks])
    unique_ids = np.unique(token_ids)
    vocab = dict(zip(unique_ids.tolist(), tokenizer.batch_decode([[int(t)] for t in unique_ids])))
    tokens = pd.DataFrame({
        "sample_id": sample_col.astype(np.int64),
        "position": np.concatenate([c["position"] for c in chunks]).astype(np.int32),
        "token_id": token_ids.astype(np.int64),
        "token": [vocab[int(t)] for t in token_ids],
        "label": (np.asarray(labels, dtype=object)[sample_col] if labels is not None
                  else np.full(len(sample_col), None, dtype=object)),
    })
    manifest = {
        "model": {
            "name": str(getattr(model, "name_or_path", "") or getattr(model.config, "name_or_path", "")
                        or type(model).__name__),
            "revision": getattr(model.config, "_commit_hash", None),
            **summary,
        },
        "data": data_spec or {},
        "parameters": {"batch_size": batch_size, "max_length": max_length, "record_probs": record_probs,
                       "shard": list(shard) if shard else None, "n_texts": len(texts),
                       "n_samples_captured": len(positions)},
        "fingerprint": fingerprint,
        "versions": package_versions(),
    }
    write_store(out_dir, manifest, arrays, tokens)
    shutil.rmtree(partial)
    store = RoutingStore.open(out_dir)
    log.info("captured %s", store)
    return store
