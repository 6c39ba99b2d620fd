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
# # Stage 2: hierarchical sparse dictionary learning (HSDL)
#
# *Which groups of experts work together, across layers, at several levels of detail?*
#
# **Status: not yet implemented.** This stage will factorise the expert activation matrix X of
# stage 1 hierarchically (the paper's section 3) into dictionaries of collaboration patterns.
# Until then it only loads X from the routing store, so that the pipeline runs end to end.

# %% tags=["parameters"]
artifacts_dir = "artifacts/tiny"
granularity = "token"
value = "weight"

# %%
from pathlib import Path

from moe_utils.expert_matrix import expert_matrix
from moe_utils.store import RoutingStore

store = RoutingStore.open(Path(artifacts_dir) / "01_capture" / "store")
X = expert_matrix(store, granularity=granularity, value=value)
print(f"X: {X.shape[0]} experts x {X.shape[1]} {granularity} columns, {X.nnz} non-zeros ({value})")
