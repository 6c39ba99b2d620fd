"""Record every pruning method's keep-masks on the embedded model and the tiny random OLMoE into
``masks_before_registry.npz``: run once on the code before the compression registry (issue 23,
commit 23f5a92) so that tests/test_compression_registry.py checks the registry reproduces them bit
for bit. Usage: ``python -m tests.data.record_masks`` (re-running it on later code only records
that code's masks)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import scipy.sparse as sp

from moe_utils.compression import caep, pruning
from moe_utils.compression.calibration import calibrate
from moe_utils.models.loading import load_model, moe_layers

from tests.conftest import TEXTS

OUT = Path(__file__).with_name("masks_before_registry.npz")
RATIOS = (0.25, 0.5, 0.75)
METHODS = ("caep", "caep_layer", "frequency", "router_weight", "ean", "reap", "output", "random")


def case(name: str):
    """(model, budget, stats, dictionary) of one recorded case, built the same way every time."""
    model, tok = load_model(name)
    layers = moe_layers(model)
    budget = caep.PruningBudget.for_model(model, layers)
    stats = calibrate(model, tok, TEXTS, batch_size=3, max_length=64, keep_hidden=64, progress=False)
    rng = np.random.default_rng(0)
    D = rng.random((budget.n_experts, 6))
    R = sp.random(6, 50, density=0.4, random_state=1, format="csr")
    return model, budget, stats, (D, R)


def main() -> None:
    arrays = {}
    for name in ("embedded", "random:olmoe"):
        model, budget, stats, dictionary = case(name)
        masks = pruning.pruning_masks(RATIOS, budget=budget, methods=METHODS, stats=stats, dictionary=dictionary,
                                      seeds=(0, 1), model=model, progress=False)
        for m in masks:
            arrays[f"{name}|{m.method}|{m.ratio}|{m.seed}"] = m.keep
    np.savez_compressed(OUT, **arrays)
    print(f"{len(arrays)} masks -> {OUT}")


if __name__ == "__main__":
    main()
