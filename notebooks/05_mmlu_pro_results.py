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
# # Stage 5: MMLU-Pro results and findings
#
# *Does pruning for one domain cost the others?*
#
# **Status: not yet implemented.** This stage will prune for one MMLU-Pro domain at a time and evaluate on all (the paper's Fig 9), with uncertainty, and summarise the study's findings.
# Until then it only checks that the routing store of stage 1 is there, so that the pipeline
# runs end to end.

# %% tags=["parameters"]
artifacts_dir = "artifacts/tiny"

# %%
from pathlib import Path

from moe_utils.store import RoutingStore

RoutingStore.open(Path(artifacts_dir) / "01_capture" / "store")
