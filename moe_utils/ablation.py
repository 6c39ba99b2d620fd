"""Why does CAEP lose to random masks on the embedded model? CAEP's settings changed one at a time.

CAEP (the paper's Algorithm 1, section 4) depends on choices the paper fixes without testing:
the text its dictionary is fitted on, the HSDL level and dictionary size it reads contributions
from, the threshold ratio k1, and pruning globally rather than layer by layer. :func:`caep_variants`
builds CAEP's mask at one ratio with exactly one of these changed from the stage's reference
setting (a one-factor-at-a-time ablation); the stage evaluates them like every other mask and
compares each with random masks on the same documents (:func:`moe_utils.pruning_eval.comparisons`).

Refitted dictionaries (another size, another calibration text) use the stage-2 model's
hyperparameters and are cached under ``cache_dir``, keyed by their inputs; the routing of the
WikiText-2 calibration text is captured from the model as stage 1 does (:func:`moe_utils.routing.capture_routing`).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.base import clone

from moe_utils.artifacts import json_digest, sha256_bytes
from moe_utils.fingerprint import dependency_key, is_stale
from moe_utils.caep import PruningBudget, caep
from moe_utils.expert_matrix import expert_matrix
from moe_utils.hsdl import HSDL
from moe_utils.pruning import PruningMask, hsdl_factors
from moe_utils.routing import capture_routing, model_identity

#: How the method of every variant's mask begins: ``"caep [k1 0.8]"``.
VARIANT_PREFIX = "caep ["


def is_variant(method: str) -> bool:
    """Whether ``method`` names one of the ablation's CAEP variants (not a method of Table 1)."""
    return method.startswith(VARIANT_PREFIX)


#: The factor of each variant, in the order the page shows them.
FACTORS = ("reference", "calibration text", "HSDL level", "dictionary size", "threshold k1", "scope")


def refit(X, base: HSDL, levels: Sequence[float], cache_dir: str | os.PathLike) -> HSDL:
    """An HSDL model with ``base``'s hyperparameters but ``levels``, fitted on ``X`` (cached)."""
    fresh = clone(base).set_params(levels=list(levels))
    params = fresh.get_params()
    X = X.tocsr()
    key = json_digest(dependency_key({"params": params, "shape": X.shape,
                                      "X": sha256_bytes(X.data.tobytes() + X.indices.tobytes() + X.indptr.tobytes())}))
    path = Path(cache_dir) / f"hsdl-{key}"
    if (path / "manifest.json").is_file() and not is_stale(path / "manifest.json"):
        return HSDL.load(path, device="cpu")
    model = fresh.fit(X)
    model.save(path, extra={"ablation": {"levels": list(levels)}})
    return model


def routing_matrix(model, tokenizer, texts: Sequence[str], *, cache_dir: str | os.PathLike, max_length: int,
                   batch_size: int = 8):
    """X (experts x tokens, routing weights) of ``model`` on ``texts``, captured into a store
    under ``cache_dir`` (reused when the same model and texts were captured before)."""
    key = json_digest(dependency_key({"model": model_identity(model), "texts": list(texts),
                                      "max_length": max_length}))
    store = capture_routing(model, tokenizer, list(texts), out_dir=Path(cache_dir) / f"store-{key}",
                            batch_size=batch_size, max_length=max_length, progress=False)
    return expert_matrix(store)


def caep_variants(hsdl: HSDL, X, ratio: float, *, budget: PruningBudget, threshold_ratio: float, level: int = 1,
                  k1_values: Sequence[float] = (0.8, 0.99), size_values: Sequence[float] = (0.5, 2.0),
                  other_X: tuple[str, object] | None = None, cache_dir: str | os.PathLike) -> pd.DataFrame:
    """CAEP's mask at ``ratio`` with one setting changed at a time; one row per variant with
    ``factor``, ``setting`` and ``mask`` (a :class:`~moe_utils.pruning.PruningMask` whose method
    names the variant). The reference row is the stage's CAEP (``hsdl`` at ``level``, k1
    ``threshold_ratio``); ``scope`` is the per-layer form, which the stage evaluates as
    ``caep_layer``; ``other_X`` = (name, X of another calibration text)."""
    n_levels = len(hsdl.dictionaries_)

    def mask(D, R, k1, label):
        result = caep(D, R, k1, ratio, budget=budget)
        return PruningMask(f"{VARIANT_PREFIX}{label}]", ratio, result.keep, note=result.note)

    D, R = hsdl_factors(hsdl, level=level)
    p1 = hsdl.level_sizes_[0]
    rows = [("reference", f"stage-1 prompts, level {level}, {hsdl.level_sizes_[level - 1]} atoms, "
             f"k1 {threshold_ratio}, "
             "global", mask(D, R, threshold_ratio, "reference"))]
    if other_X is not None:
        name, X_other = other_X
        other = refit(X_other, hsdl, hsdl.get_params()["levels"], cache_dir)
        rows.append(("calibration text", name, mask(*hsdl_factors(other, level=level), threshold_ratio, name)))
    for other_level in range(1, n_levels + 1):
        if other_level != level:
            rows.append(("HSDL level", f"level {other_level} ({hsdl.level_sizes_[other_level - 1]} atoms)",
                         mask(*hsdl_factors(hsdl, level=other_level), threshold_ratio, f"level {other_level}")))
    for size in size_values:
        if clone(hsdl).set_params(levels=[size])._level_sizes(X.shape[0], X.shape[1])[0] == p1:
            continue  # the reference's own size
        fitted = refit(X, hsdl, [size], cache_dir)
        atoms = fitted.level_sizes_[0]
        rows.append(("dictionary size", f"{atoms} atoms (level 1 only)",
                     mask(*hsdl_factors(fitted, level=1), threshold_ratio, f"{atoms} atoms")))
    for k1 in k1_values:
        if not np.isclose(k1, threshold_ratio):
            rows.append(("threshold k1", f"k1 {k1}", mask(D, R, k1, f"k1 {k1}")))
    return pd.DataFrame(rows, columns=["factor", "setting", "mask"])


def ablation_table(variants: pd.DataFrame, compared: pd.DataFrame, measures: Sequence[str]) -> pd.DataFrame:
    """Each variant's paired difference from random masks at its ratio, per measure (estimate,
    interval), and the experts it prunes; ``per layer`` is read from the ``caep_layer`` rows."""
    from moe_utils.pruning_eval import format_value, measure_spec, star

    methods = [m.method for m in variants["mask"]]
    rows = list(zip(variants["factor"], variants["setting"], methods))
    rows.append(("scope", "per layer (each layer keeps its share)", "caep_layer"))
    ratio = variants["mask"].iloc[0].ratio
    out = []
    for factor, setting, method in rows:
        row = {"factor": factor, "setting": setting}
        for measure in measures:
            kind, label = measure_spec(measure)[:2]
            hit = compared[(compared["method"] == method) & (compared["reference"] == "random")
                           & np.isclose(compared["ratio"], ratio) & (compared["measure"] == measure)]
            if hit.empty:
                continue
            r = hit.iloc[0]
            row[f"{label}: vs random"] = (f"{format_value(kind, r.estimate, True)} [{format_value(kind, r.low, True)}, "
                                          f"{format_value(kind, r.high, True)}]{star(r)}")
        out.append(row)
    return pd.DataFrame(out)
