"""Artifacts on disk: atomic writes, digests, package versions and checksummed folders.

Every stage of the study leaves files that a later stage (or a later run of the same stage) reads
back. They all go through this module, so that one rule holds everywhere:

* a file is written atomically (:func:`atomic_write_bytes`, :func:`atomic_write_with`): a reader
  sees the old file or the whole new one, never a part; temporary names are unique per process;
* an *artifact folder* (:func:`write_artifact`) holds its files and a ``manifest.json`` listing
  the sha256 of each, written last: a folder without a manifest is unfinished, and
  :func:`read_artifact` refuses a manifest that is not valid JSON, not an object, of another
  format, or whose files are missing or do not match their checksums, with a message that names
  the folder and what to re-run;
* a *keyed cache* (:class:`moe_utils.common.cache.KeyedCache`) keeps one artifact folder per key;
  an entry that does not verify is recomputed, never trusted.

The routing store (:mod:`moe_utils.capture.store`), the HSDL estimator (:meth:`moe_utils.patterns.hsdl.HSDL.save`),
stage 4's pruning artifact (:func:`moe_utils.compression.pruning.save_pruning`), the calibration, mask and
evaluation caches and stage 5's results are such folders.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Callable, Iterable, Mapping
from importlib import metadata
from pathlib import Path
from typing import Any

MANIFEST = "manifest.json"
#: What a file of an artifact folder is given as: its bytes, or a function that writes it to a path.
Content = bytes | Callable[[str], None]


class ArtifactError(ValueError):
    """An artifact is unreadable, incomplete, corrupted or of another format; the message says
    which folder and what to re-run."""


class ArtifactMissing(ArtifactError, FileNotFoundError):
    """An artifact folder has no manifest: it was never written, or its writer did not finish."""


# ----------------------------------------------------------------------------------- digests
def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def json_digest(obj: Any) -> str:
    """sha256 of ``obj`` as canonical JSON (sorted keys; what JSON cannot hold, as ``str``): the
    name of a cache entry, a fingerprint of parameters."""
    return sha256_bytes(json.dumps(obj, sort_keys=True, default=str).encode())


def package_versions(names: tuple[str, ...] = ("torch", "transformers", "numpy", "moe-collab-study")) -> dict:
    """Installed version of each package (None where it is not installed), for a manifest."""
    versions = {}
    for name in names:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


# ------------------------------------------------------------------------------ atomic writes
def atomic_write_with(path: str | os.PathLike, write: Callable[[str], None]) -> None:
    """Let ``write(temporary_path)`` write the file, then move it to ``path`` in one step, so that
    readers see either the old file or the whole new one. The temporary name is unique per process."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically, flushed to disk before it replaces the old file."""
    def write(tmp: str) -> None:
        with open(tmp, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())

    atomic_write_with(path, write)


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_bytes(path, json.dumps(obj, indent=1, sort_keys=True, default=str).encode())


# ---------------------------------------------------------------------------- artifact folders
def write_artifact(path: str | os.PathLike, files: Mapping[str, Content], manifest: Mapping[str, Any]) -> dict:
    """Write an artifact folder: every file of ``files`` atomically, then ``manifest.json`` holding
    ``manifest`` and ``files``: the sha256 of each file. The old manifest is removed first, so the
    folder is invalid until the new one lands. Returns the manifest written."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    (path / MANIFEST).unlink(missing_ok=True)
    digests = {}
    for name, content in files.items():
        if isinstance(content, bytes):
            atomic_write_bytes(path / name, content)
            digests[name] = sha256_bytes(content)
        else:
            atomic_write_with(path / name, content)
            digests[name] = sha256_file(path / name)
    written = {**manifest, "files": digests}
    atomic_write_json(path / MANIFEST, written)
    return written


def read_manifest(path: str | os.PathLike, *, what: str, fix: str,
                  error: type[Exception] = ArtifactError) -> dict:
    """The manifest of the artifact folder ``path``, as an object; ``error`` (naming the file and
    ``fix``, what to do) when it is not valid JSON or not an object, :class:`ArtifactMissing`
    when there is none."""
    where = Path(path) / MANIFEST
    if not where.is_file():
        raise ArtifactMissing(f"no {what} at {path}: {MANIFEST} is missing; {fix}")
    try:
        manifest = json.loads(where.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise error(f"{where} is not valid JSON ({err}); {fix}") from err
    if not isinstance(manifest, dict):
        raise error(f"{where} is not a valid {what} manifest: it holds a {type(manifest).__name__}, "
                    f"not an object; {fix}")
    return manifest


def verify_files(path: str | os.PathLike, manifest: Mapping[str, Any], *, what: str, fix: str,
                 required: Iterable[str] = (), exact: bool = False, verify: bool = True,
                 error: type[Exception] = ArtifactError) -> None:
    """Check the files a manifest lists: ``files`` must map names to sha256 strings and hold every
    name of ``required`` (exactly those with ``exact``); every file must exist and, with ``verify``,
    match its checksum. Raises ``error`` naming the folder, the file and ``fix``."""
    path = Path(path)
    files, required = manifest.get("files"), sorted(required)
    listed = sorted(files) if isinstance(files, dict) else files
    if (not isinstance(files, dict) or not all(isinstance(v, str) for v in files.values())
            or not set(required) <= set(files) or (exact and set(files) != set(required))):
        raise error(f"{path}: the manifest must list {'exactly ' if exact else ''}{required} with their sha256 "
                    f"checksums, it lists {listed!r}; {fix}")
    for name, expected in files.items():
        if not (path / name).is_file():
            raise error(f"{path}: {name} is listed in the manifest but missing; {fix}")
        if verify and sha256_file(path / name) != expected:
            raise error(f"{path}: checksum of {name} does not match the manifest: the {what} was modified or "
                        f"corrupted; {fix}")


def read_artifact(path: str | os.PathLike, *, what: str, fix: str, format: str | None = None,
                  required: Iterable[str] = (), exact: bool = False, verify: bool = True) -> dict:
    """The verified manifest of an artifact folder written by :func:`write_artifact`: its
    ``format`` must be ``format`` (when given) and its files those of :func:`verify_files`."""
    manifest = read_manifest(path, what=what, fix=fix)
    if format is not None and manifest.get("format") != format:
        raise ArtifactError(f"{path}: format {manifest.get('format')!r} is not {format!r}; {fix}")
    verify_files(path, manifest, what=what, fix=fix, required=required, exact=exact, verify=verify)
    return manifest
