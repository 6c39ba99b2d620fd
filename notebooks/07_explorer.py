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
# # Explorer: look at any token, atom or expert of this run
#
# *Which experts did each token go to, which collaboration pattern explains it, and what would pruning take away?*
#
# The stages before this one summarise the run in tables and figures. This page lets you look at the
# run itself: the routing of single tokens (stage 1), the HSDL atoms that explain them (stages 2 and
# 3), the experts' partners in other layers, and the experts a pruning mask removes (stage 4).
# {cite:t}`tang2025unveiling` built a viewer of this kind that needs a server; this one is part of
# the page, works offline and keeps working when the book is opened from disk.
#
# **How to use it.**
# - *Token view*: hover over a token, or focus it with the Tab key and move with the arrow keys. The
#   grid shows its routing weights in every MoE layer, and the panel below the grid lists the atoms
#   with the largest contributions at each level. Click a token or press Enter to keep it shown.
# - *Atom view*: select an atom in the list under the tokens. Its experts are outlined on the grid,
#   the tokens it explains best are outlined in the text, and the panel gives its label, its top
#   tokens and its domain enrichment with questions as the unit (stage 3, section 7).
# - *Expert view*: select a cell of the grid. Its partners in other layers (by co-activation lift)
#   are outlined, and the panel lists them with its usage per domain.
# - *Pruning view*: choose a mask of stage 4. The pruned experts are hatched on the grid, and the
#   tokens whose highest-weight expert in some layer is pruned are underlined.
#
# Exercises that use the explorer are on the {doc}`../teaching` page.

# %% tags=["parameters"]
artifacts_dir = "artifacts/tiny"
atom_threshold = 0.5
annotation_alpha = 0.01
annotation_correction = "bh"
seed = 0
explorer_questions = 30
explorer_max_tokens = 160
explorer_partners = 5

# %% tags=["hide-input"]
from IPython.display import HTML, Markdown, display

from moe_utils.patterns import annotation
from moe_utils.stages import explorer
from moe_utils.patterns import token_null as tn
from moe_utils.common.artifacts import ArtifactMissing
from moe_utils.patterns.hsdl import HSDL
from moe_utils.common.markup import code_span
from moe_utils.compression.pruning import load_pruning
from moe_utils.stages import glue_values, model_caveat, stage_paths
from moe_utils.capture.store import RoutingStore

paths = stage_paths(artifacts_dir)

# %% [markdown]
# ## 1. The run's artifacts
#
# The routing store of stage 1, the HSDL of stage 2, its annotation as stage 3 computes it (same
# threshold, test and correction) and the masks of stage 4.

# %%
store = RoutingStore.open(paths.store)
hsdl = HSDL.load(paths.hsdl)
model_name = store.manifest["model"]["name"]
result = annotation.annotate(store, hsdl, annotation.tokenizer_for(store), alpha=annotation_alpha,
                             correction=annotation_correction, threshold=atom_threshold)
try:
    masks, _, _ = load_pruning(paths.pruning)
except ArtifactMissing:
    masks = []
data = explorer.explorer_data(store, hsdl, result, masks, run={"artifacts": artifacts_dir},
                              max_questions=explorer_questions, max_tokens=explorer_max_tokens, seed=seed,
                              n_partners=explorer_partners,
                              lift_given_token=tn.coselection(store, seed=seed).lift(given_token=True))
meta = data["meta"]
assert meta["n_tokens_shown"] == len(data["tokens"]["row"]) > 0
glue_values(explorer_model=model_name, explorer_questions_shown=meta["n_questions_shown"],
            explorer_questions_all=meta["n_questions"], explorer_masks=len(data["masks"]))
display(Markdown(
    f"**Model:** {code_span(model_name)}. **Shown:** {meta['n_tokens_shown']} tokens of {meta['n_questions_shown']} of the "
    f"run's {meta['n_questions']} questions"
    + (" (a random sample taken from each domain in turn)" if meta["subsampled"] else "")
    + (f", each cut after its first {explorer_max_tokens} tokens" if meta["truncated"] else "")
    + f". **HSDL:** {len(data['levels'])} levels. **Pruning masks:** {len(data['masks'])}."))
if caveat := model_caveat(model_name):
    display(Markdown(caveat))

# %% [markdown]
# ## 2. The explorer

# %% tags=["remove-input"]
HTML(explorer.explorer_html(data))

# %% [markdown]
# ## Summary
#
# - Every token of the questions shown carries its own routing, so any coloured token of the
#   annotation page can be checked here against the experts it actually used.
# - The atom of a token is the one that reconstructs the largest part of its routing; the panel lists
#   the next ones too, and a token is often explained by several atoms together.
# - Lifts above 1 mean two experts of different layers are chosen together more often than if the
#   layers chose independently. The lift given the token (stage 1, section 5) asks the same of layers
#   that know the token: a partner whose lift given the token is near 1 is explained by the token
#   alone, not by collaboration.
