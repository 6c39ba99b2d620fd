"""A keyed cache: one verified artifact folder per key (a JSON-able description of everything a result
depends on, named by :func:`moe_utils.common.artifacts.json_digest` of its
:func:`moe_utils.common.fingerprint.dependency_key`); an entry that does not verify is recomputed,
never trusted. The calibration, mask and evaluation caches of stages 4 and 5 are such caches."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

from moe_utils.common.artifacts import MANIFEST, ArtifactError, Content, json_digest, read_artifact, write_artifact
from moe_utils.common.fingerprint import dependency_key, is_stale

log = logging.getLogger(__name__)
T = TypeVar("T")


class KeyedCache:
    """Results kept under ``root``, one artifact folder per key: ``root/<kind>-<json_digest(key)>/``.

    The key is a JSON-able description of what the result is computed from (model identity,
    input digests, settings); :func:`moe_utils.common.fingerprint.dependency_key` adds the package's code,
    the data and the library versions, so no entry outlives a change to any of them. The full key
    is kept in the entry's manifest. :meth:`get_or_compute` reads an entry only after it verifies
    and when it was not written before ``$MOE_FRESH_SINCE`` (``--force``), and recomputes (with a
    warning for a damaged one) otherwise. A cache with ``root=None`` keeps nothing.
    """

    FORMAT = "moe-cache/1"

    def __init__(self, root: str | os.PathLike | None, kind: str):
        self.root = None if root is None else Path(root)
        self.kind = kind

    def entry(self, key: Any) -> Path | None:
        return None if self.root is None else self.root / f"{self.kind}-{json_digest(dependency_key(key))}"

    def load(self, key: Any) -> tuple[Path, dict] | None:
        """``(folder, manifest)`` of the verified entry for ``key``, or None (also for one written
        before ``$MOE_FRESH_SINCE``)."""
        folder = self.entry(key)
        if folder is None or not folder.is_dir() or is_stale(folder / MANIFEST):
            return None
        try:
            manifest = read_artifact(folder, what=f"{self.kind} cache entry", fix="it is recomputed",
                                     format=self.FORMAT)
        except ArtifactError as err:
            log.warning("%s", err)
            return None
        return folder, manifest

    def store(self, key: Any, files: Mapping[str, Content], meta: Mapping[str, Any] | None = None) -> Path | None:
        """Write the entry for ``key``: ``files`` and a manifest holding ``meta`` and the key."""
        folder = self.entry(key)
        if folder is not None:
            write_artifact(folder, files, {"format": self.FORMAT, "kind": self.kind, "key": dependency_key(key),
                                           **(meta or {})})
        return folder

    def get_or_compute(self, key: Any, compute: Callable[[], T],
                       encode: Callable[[T], tuple[Mapping[str, Content], Mapping[str, Any]]],
                       decode: Callable[[Path, dict], T]) -> tuple[T, bool]:
        """``(value, from_cache)``: ``decode(folder, manifest)`` of a verified entry, else
        ``compute()``, stored as ``encode(value) = (files, meta)``."""
        found = self.load(key)
        if found is not None:
            return decode(*found), True
        value = compute()
        if self.root is not None:
            self.store(key, *encode(value))
        return value, False
