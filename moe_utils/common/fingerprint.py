"""Content-addressed keys: the one mechanism every reuse decision of the study goes through.

A result may be reused only when everything it was computed from is unchanged. The pipeline's
stage fingerprints (:func:`moe_utils.pipeline.runner.stage_fingerprint`), the routing capture's store
(:func:`moe_utils.capture.routing.capture_routing`) and every :class:`moe_utils.common.cache.KeyedCache`
(calibration, output search, masks, evaluations, the ablation's refits and captures) build their
keys with :func:`dependency_key`, which adds to the caller's own parameters:

* ``code``: the digest of *every* file of the ``moe_utils`` package (Python modules, the task
  YAMLs under ``tasks/``, the embedded model, any data shipped with it), so that no edit to code or
  configuration a result might depend on can leave a stale entry behind;
* ``data``: each data location variable (:data:`DATA_ENV`) with the digest of what it names;
* ``versions``: the installed torch, transformers, lm-eval and numpy.

A model's weights enter through :func:`model_digest` (the digest of its checkpoint files; for a
``random:`` model its architecture, the package code and versions fix the weights) and
:func:`loaded_model_digest` (the same for a model in memory, from the name it was loaded by).

Hashing is by content (sha256), made cheap by a table of file digests keyed by path, size and
modification time, kept in this process and in the file named by ``$MOE_DIGEST_CACHE`` (the
pipeline points it into the run's ``artifacts_dir``), so a checkpoint is read once, not at every run.

``$MOE_FRESH_SINCE`` (set by ``python -m moe_utils.pipeline --force``) is a Unix time: entries written
before it are recomputed (:func:`is_stale`), entries written since are reused.
"""

from __future__ import annotations

import json
import os
from importlib import metadata
from pathlib import Path
from typing import Any

from moe_utils.common.data_env import DATA_ENV as DATA_LOCATIONS
from moe_utils.common.artifacts import atomic_write_json, json_digest, sha256_file
from moe_utils.models.loading import EMBEDDED, EMBEDDED_DIR, RANDOM_PREFIX

PACKAGE = Path(__file__).resolve().parents[1]
#: Environment variables naming the data a stage reads (or whether the Hub may be used).
#: what the data a result read depends on: every data location (:mod:`moe_utils.common.data_env`) and
#: whether the Hub is off
DATA_ENV = (*DATA_LOCATIONS, "HF_HUB_OFFLINE")
DIGEST_CACHE_ENV = "MOE_DIGEST_CACHE"
FRESH_ENV = "MOE_FRESH_SINCE"
VERSIONED = ("torch", "transformers", "lm_eval", "numpy")

_digests: dict[str, list] = {}  # resolved path -> [size, mtime_ns, sha256]
_loaded_from: str | None = None


def _table() -> dict[str, list]:
    """The digest table, read once from ``$MOE_DIGEST_CACHE`` (an unreadable one is ignored)."""
    global _loaded_from
    where = os.environ.get(DIGEST_CACHE_ENV)
    if where and where != _loaded_from:
        _loaded_from = where
        try:
            stored = json.loads(Path(where).read_text())
            if isinstance(stored, dict):
                _digests.update({k: v for k, v in stored.items() if isinstance(v, list) and len(v) == 3})
        except (OSError, ValueError):
            pass
    return _digests


def _save_table() -> None:
    where = os.environ.get(DIGEST_CACHE_ENV)
    if where:
        try:
            atomic_write_json(where, _digests)
        except OSError:  # only a speed-up: a table that cannot be written is recomputed next time
            pass


def file_digest(path: str | os.PathLike) -> str:
    """sha256 of a file's contents, read only when its path, size or modification time is new."""
    path = Path(path).resolve()
    stat = path.stat()
    table, name = _table(), str(path)
    known = table.get(name)
    if known and known[0] == stat.st_size and known[1] == stat.st_mtime_ns:
        return known[2]
    table[name] = [stat.st_size, stat.st_mtime_ns, sha256_file(path)]
    _save_table()
    return table[name][2]


def _listed(folder: Path) -> list[Path]:
    """The files under ``folder`` a result can depend on: hidden entries and byte-code left out."""
    return sorted(f for f in folder.rglob("*") if f.is_file() and "__pycache__" not in f.parts
                  and not any(p.startswith(".") for p in f.relative_to(folder).parts) and f.suffix != ".pyc")


def tree_digest(path: str | os.PathLike | None) -> str | None:
    """Digest of a file, or of every file under a folder (names and contents); None when it does not exist."""
    if path is None:
        return None
    path = Path(path).expanduser()
    if path.is_file():
        return file_digest(path)
    if not path.is_dir():
        return None
    return json_digest({str(f.relative_to(path)): file_digest(f) for f in _listed(path)})


def package_digest() -> str:
    """Digest of every file of the ``moe_utils`` package (code, task YAMLs, shipped model and data)."""
    return tree_digest(PACKAGE)


def data_digest() -> dict[str, Any]:
    """Each data variable of :data:`DATA_ENV`: its value and, where it names a file or folder, the
    digest of that content."""
    out = {}
    for name in DATA_ENV:
        value = os.environ.get(name)
        out[name] = {"value": value, "digest": tree_digest(value) if value and name.endswith("_DIR") else None}
    return out


def versions() -> dict[str, str | None]:
    found = {}
    for name in VERSIONED:
        try:
            found[name] = metadata.version(name.replace("_", "-"))
        except metadata.PackageNotFoundError:
            found[name] = None
    return found


def model_digest(name: str | None) -> dict[str, Any]:
    """What fixes a model's weights, by the name it is loaded by (:func:`moe_utils.models.loading.load_model`):
    the digest of its checkpoint files (the embedded model's folder, a local directory, a Hub
    snapshot already on this machine); for ``random:<type>``, the name (the package code and versions
    in :func:`dependency_key` fix the rest); for a Hub id not on this machine, its name."""
    if name is None or str(name).startswith(RANDOM_PREFIX):
        return {"name": name}
    if name == EMBEDDED:
        return {"name": name, "files": tree_digest(EMBEDDED_DIR)}
    if Path(name).expanduser().is_dir():
        return {"name": name, "files": tree_digest(name)}
    try:
        from huggingface_hub import snapshot_download

        local = snapshot_download(name, local_files_only=True)
    except Exception:  # noqa: BLE001 - not downloaded (yet): the loader fetches it; the name is what is known
        return {"name": name}
    return {"name": name, "files": tree_digest(local)}


def loaded_model_digest(model) -> dict[str, Any]:
    """:func:`model_digest` of a model in memory, by the name :func:`~moe_utils.models.loading.load_model`
    recorded; a model built otherwise (or a ``random:`` one) is hashed from its tensors."""
    import hashlib

    name = getattr(model, "name_or_path", None)
    found = model_digest(str(name)) if name else {"name": None}
    if "files" in found and found["files"] is not None:
        return found
    digest = hashlib.sha256()
    for key, tensor in model.state_dict().items():
        digest.update(key.encode())
        digest.update(tensor.detach().float().cpu().numpy().tobytes())
    return {**found, "tensors": digest.hexdigest()}


def dependency_key(parameters: Any) -> dict[str, Any]:
    """The key of a result computed from ``parameters`` (JSON-able: settings, input digests, model
    digest): those, the package's code, the data and the library versions."""
    return {"parameters": parameters, "code": package_digest(), "data": data_digest(), "versions": versions()}


def fresh_since() -> float | None:
    value = os.environ.get(FRESH_ENV)
    try:
        return float(value) if value else None
    except ValueError:
        return None


def is_stale(path: str | os.PathLike) -> bool:
    """Whether a stored result at ``path`` was written before ``$MOE_FRESH_SINCE``: not to be reused."""
    since = fresh_since()
    return since is not None and Path(path).exists() and Path(path).stat().st_mtime < since
