"""The routing store: captured expert routing on disk, self-describing, atomic and verifiable.

A store is a directory written by :func:`moe_utils.capture.routing.capture_routing`::

    manifest.json        model, architecture, layers, experts, top-k, data spec, parameters,
                         package versions, and the sha256 of every file below
    topk_indices.npy     (n_tokens, n_layers, k)  uint8 (or uint16 when E > 256)
    topk_weights.npy     (n_tokens, n_layers, k)  float32 routing weights the model used
    probs.npy            (n_tokens, n_layers, E)  float16 full routing probabilities (optional)
    tokens.parquet       one row per token: sample_id, position, token_id, token, label

Arrays are memory-mapped on open. The manifest is written last and atomically, so a directory
without one is never mistaken for a finished capture; a store whose checksums do not match its
manifest refuses to load. Captures split over processes (``shard=(rank, world_size)``) write
``shard-<rank>-of-<world>/`` sub-stores, which :meth:`RoutingStore.open` reads as one.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import pandas as pd

from moe_utils.common.artifacts import MANIFEST, ArtifactError, verify_files, write_artifact
from moe_utils.common.artifacts import read_manifest as read_json_manifest

ARRAYS = ("topk_indices", "topk_weights", "probs")
TOKENS = "tokens.parquet"
FORMAT_VERSION = 1
_SHARD_RE = re.compile(r"^shard-(\d+)-of-(\d+)$")


class StoreError(ArtifactError, RuntimeError):
    """A routing store is missing, incomplete, corrupted or inconsistent."""


def index_dtype(n_experts: int) -> np.dtype:
    """Smallest unsigned dtype for expert indices: 1 byte up to 256 experts, else 2."""
    if n_experts <= 256:
        return np.dtype(np.uint8)
    if n_experts <= 65536:
        return np.dtype(np.uint16)
    raise ValueError(f"{n_experts} experts per layer is more than a 2-byte index can hold")


#: What a store manifest must hold: key -> type, and the keys each ``model`` entry needs.
MANIFEST_SCHEMA = {"format_version": int, "files": dict, "model": dict}
MODEL_KEYS = ("n_layers", "n_experts", "top_k")
FIX = "re-run the capture"


def read_manifest(path: Path) -> dict:
    """A store's manifest, checked against :data:`MANIFEST_SCHEMA` (its files must list the index and
    weight arrays and the token table, each with a checksum); a :class:`StoreError` naming the file
    otherwise."""
    where = Path(path) / MANIFEST
    manifest = read_json_manifest(path, what="store", fix=FIX, error=StoreError)
    problems = [f"{key!r} must be {kind.__name__}" for key, kind in MANIFEST_SCHEMA.items()
                if not isinstance(manifest.get(key), kind)]
    if not problems:
        needed = {"topk_indices.npy", "topk_weights.npy", TOKENS}
        problems += [f"files must list {name} with its sha256" for name in sorted(needed)
                     if not isinstance(manifest["files"].get(name), str)]
        problems += [f"model.{key} must be a positive integer" for key in MODEL_KEYS
                     if not (isinstance(manifest["model"].get(key), int) and manifest["model"][key] > 0)]
    if problems:
        raise StoreError(f"{where} is not a valid store manifest: " + "; ".join(problems) + ". Re-run the capture")
    return manifest


def write_store(path: Path, manifest: dict, arrays: dict[str, np.ndarray], tokens: pd.DataFrame) -> None:
    """Write a complete store (:func:`moe_utils.common.artifacts.write_artifact`): arrays and token table
    first, the checksummed manifest last."""
    files = {f"{name}.npy": partial(_save_npy, array=array) for name, array in arrays.items()}
    files[TOKENS] = lambda tmp: tokens.to_parquet(tmp, index=False)
    write_artifact(path, files, {**manifest, "format_version": FORMAT_VERSION, "n_tokens": len(tokens)})


def _save_npy(path: str, array: np.ndarray) -> None:
    with open(path, "wb") as handle:  # a file handle: np.save would append ".npy" to a bare name
        np.save(handle, array)


@dataclass
class RoutingStore:
    """Captured routing, opened from a store directory (see the module docstring for the layout).

    Attributes:
        path: the store directory.
        manifest: what produced the capture (model, data, parameters, versions, checksums).
        topk_indices: (n_tokens, n_layers, k) selected experts per token and MoE layer.
        topk_weights: (n_tokens, n_layers, k) their routing weights.
        probs: (n_tokens, n_layers, E) full routing probabilities, or None if not recorded.
        tokens: token table with columns sample_id, position, token_id, token, label.
    """

    path: Path
    manifest: dict
    topk_indices: np.ndarray
    topk_weights: np.ndarray
    probs: np.ndarray | None
    tokens: pd.DataFrame

    @property
    def n_tokens(self) -> int:
        return self.topk_indices.shape[0]

    @property
    def n_layers(self) -> int:
        return self.topk_indices.shape[1]

    @property
    def top_k(self) -> int:
        return self.topk_indices.shape[2]

    @property
    def n_experts(self) -> int:
        return int(self.manifest["model"]["n_experts"])

    @property
    def n_samples(self) -> int:
        return int(self.tokens["sample_id"].nunique())

    def __repr__(self) -> str:
        model = self.manifest["model"]
        return (f"RoutingStore({str(self.path)!r}, model={model['name']!r}, tokens={self.n_tokens}, "
                f"samples={self.n_samples}, layers={self.n_layers}, experts={self.n_experts}, top_k={self.top_k})")

    @classmethod
    def open(cls, path: str | os.PathLike, *, verify: bool = True, mmap: bool = True) -> "RoutingStore":
        """Open a store (or a directory of capture shards, read as one store in sample order).

        With ``verify`` (the default) every file's sha256 is checked against the manifest.
        """
        path = Path(path)
        if (path / MANIFEST).is_file():
            return cls._open_single(path, verify=verify, mmap=mmap)
        shards = sorted(p for p in path.glob("shard-*-of-*") if p.is_dir()) if path.is_dir() else []
        if shards:
            return cls._open_shards(path, shards, verify=verify)
        hint = " (a capture was started here but did not finish: re-run it to resume)" if (
            path / ".partial").is_dir() else ""
        raise StoreError(f"no routing store at {path}: {MANIFEST} is missing{hint}")

    @classmethod
    def _open_single(cls, path: Path, *, verify: bool, mmap: bool) -> "RoutingStore":
        manifest = read_manifest(path)
        if manifest.get("format_version") != FORMAT_VERSION:
            raise StoreError(f"{path}: store format {manifest.get('format_version')} is not {FORMAT_VERSION}")
        verify_files(path, manifest, what="store", fix="delete the directory and re-run the capture", verify=verify,
                     error=StoreError)
        arrays = {
            name: np.load(path / f"{name}.npy", mmap_mode="r" if mmap else None)
            for name in ARRAYS if f"{name}.npy" in manifest["files"]
        }
        tokens = pd.read_parquet(path / TOKENS)
        if len(tokens) != arrays["topk_indices"].shape[0]:
            raise StoreError(f"{path}: token table and arrays disagree on the number of tokens")
        model = manifest["model"]
        shape = arrays["topk_indices"].shape
        if shape[1:] != (model["n_layers"], model["top_k"]) or arrays["topk_weights"].shape != shape:
            raise StoreError(f"{path}: the manifest says {model['n_layers']} MoE layers and top-{model['top_k']}, "
                             f"the arrays hold {shape[1:]}; the manifest was edited: re-run the capture")
        if shape[0] and int(np.asarray(arrays["topk_indices"]).max()) >= model["n_experts"]:
            raise StoreError(f"{path}: an expert index reaches beyond the manifest's n_experts = "
                             f"{model['n_experts']}; the manifest was edited: re-run the capture")
        return cls(path, manifest, arrays["topk_indices"], arrays["topk_weights"], arrays.get("probs"), tokens)

    @classmethod
    def _open_shards(cls, path: Path, shards: list[Path], *, verify: bool) -> "RoutingStore":
        ranks = {}
        for shard in shards:
            rank, world = map(int, _SHARD_RE.match(shard.name).groups())
            ranks[rank] = (world, shard)
        worlds = {world for world, _ in ranks.values()}
        if len(worlds) != 1:
            raise StoreError(f"{path}: shards of different world sizes {sorted(worlds)}; remove the stale ones")
        world = worlds.pop()
        missing = sorted(set(range(world)) - set(ranks))
        if missing:
            raise StoreError(f"{path}: shards {missing} of {world} are missing; run those ranks' captures")
        parts = [cls._open_single(ranks[r][1], verify=verify, mmap=True) for r in range(world)]
        first = parts[0].manifest
        for part in parts[1:]:
            if part.manifest["fingerprint"]["model"] != first["fingerprint"]["model"]:
                raise StoreError(f"{path}: shards were captured from different models")
        manifest = {**first, "shards": [str(p.path.name) for p in parts],
                    "n_tokens": sum(p.n_tokens for p in parts)}
        probs = None if parts[0].probs is None else np.concatenate([p.probs for p in parts])
        tokens = pd.concat([p.tokens for p in parts], ignore_index=True)
        return cls(path, manifest, np.concatenate([p.topk_indices for p in parts]),
                   np.concatenate([p.topk_weights for p in parts]), probs, tokens)
