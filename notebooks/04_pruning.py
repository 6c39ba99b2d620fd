# ---
# jupyter:
#   jupytext:
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Stage 4: pruning experts (CAEP and baselines)
#
# *Which experts can be removed, and what does it cost?*
#
# **Status: not yet implemented.** This stage will compute CAEP (the paper's Algorithm 1) and current baselines, mask and physically remove experts, and evaluate the pruned models through lm-evaluation-harness (the paper's Table 1 and Fig 8).
# Until then it only checks that the routing store of stage 1 is there, so that the pipeline
# runs end to end.

# %% tags=["parameters"]
artifacts_dir = "artifacts/tiny"

# %%
from pathlib import Path

from moe_utils.store import RoutingStore

RoutingStore.open(Path(artifacts_dir) / "01_capture" / "store")
