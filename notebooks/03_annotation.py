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
# # Stage 3: semantic annotation of collaboration patterns
#
# *What does each collaboration pattern respond to, and how do domains use experts?*
#
# **Status: not yet implemented.** This stage will label every HSDL pattern automatically (top tokens, token classes, MMLU-Pro category enrichment) and draw the paper's Fig 5 and Fig 7.
# Until then it only checks that the routing store of stage 1 is there, so that the pipeline
# runs end to end.

# %% tags=["parameters"]
artifacts_dir = "artifacts/tiny"

# %%
from pathlib import Path

from moe_utils.store import RoutingStore

RoutingStore.open(Path(artifacts_dir) / "01_capture" / "store")
