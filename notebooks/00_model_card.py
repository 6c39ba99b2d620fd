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
# # The embedded model: model card
#
# *A small Mixture-of-Experts language model trained here, so that the study runs anywhere.*
#
# The default profile of this study runs on this model. It is an OLMoE-style MoE
# {cite}`muennighoff2024olmoe` (softmax top-k routing, no shared experts) in transformers' own
# `OlmoeForCausalLM`, so it loads with plain `AutoModelForCausalLM.from_pretrained` and goes
# through exactly the same capture, pruning and evaluation code as a Hub checkpoint. It was
# trained on WikiText-2 {cite}`merity2016pointer` and has never seen MMLU or MMLU-Pro text, which
# the study evaluates on.
#
# **What you will see:** its architecture and size, how it was trained (command, time, loss
# curve), how good a language model it is (word-level perplexity against a unigram baseline,
# measured here and through lm-evaluation-harness {cite}`eval-harness`), and how evenly it uses
# its experts. Everything on this page is recomputed from the shipped weights by this run,
# except the training record (command, wall time, loss curve), which is read from
# `training.json` next to the weights.

# %% tags=["parameters"]
wikitext_dir = None
artifacts_dir = "artifacts/tiny"

# %% tags=["hide-input"]
import json

import pandas as pd
from IPython.display import Markdown, display
from myst_nb import glue

from moe_utils import expert_matrix as xm
from moe_utils import plotting
from moe_utils.evaluation import evaluate
from moe_utils.models import load_model
from moe_utils.routing import capture_routing
from moe_utils.stages import stage_paths
from moe_utils.tiny_moe import EMBEDDED_DIR, parameter_counts
from moe_utils.wikitext import load_wikitext, unigram_word_perplexity, word_perplexity

plotting.use_style()
record = json.loads((EMBEDDED_DIR / "training.json").read_text())
lm, tokenizer = load_model("embedded")
config = lm.config

# %% [markdown]
# ## 1. Architecture

# %%
counts = parameter_counts(lm)
assert counts == record["parameters"], "the shipped weights do not match their training record"
glue("total_params_m", counts["total"] / 1e6, display=False)
glue("active_params_m", counts["active_per_token"] / 1e6, display=False)
glue("n_moe_layers", config.num_hidden_layers, display=False)
glue("n_experts_per_layer", config.num_experts, display=False)
glue("model_top_k", config.num_experts_per_tok, display=False)
pd.DataFrame({
    "value": [
        "OlmoeForCausalLM (transformers, native)", config.num_hidden_layers, config.num_experts,
        config.num_experts_per_tok, config.num_hidden_layers * config.num_experts, config.hidden_size,
        config.intermediate_size, config.num_attention_heads, config.vocab_size,
        f"{counts['total']:,}", f"{counts['active_per_token']:,}", f"{counts['routed_experts']:,}",
        f"{(EMBEDDED_DIR / 'model.safetensors').stat().st_size / 2**20:.1f} MiB (float32, safetensors)",
    ]
}, index=[
    "architecture", "MoE layers", "routed experts per layer", "top-k", "N_e (experts in X)", "hidden size",
    "expert intermediate size", "attention heads", "vocabulary (byte-level BPE)", "parameters, total",
    "parameters, active per token", "parameters in routed experts", "weights on disk",
])

# %% [markdown]
# ## 2. Training
#
# Data: the WikiText-2 training split (CC BY-SA 3.0, about 2 million words of Wikipedia
# articles). The tokenizer is a byte-level BPE trained on the same split with the `tokenizers`
# library. The loss is next-token cross-entropy plus OLMoE's load-balancing auxiliary loss, which
# keeps every expert in use.

# %%
glue("train_minutes", record["train_seconds"] / 60, display=False)
glue("train_command", record["command"], display=False)
display(Markdown(
    f"Command (seeded, reproducible):\n\n```bash\n{record['command']}\n```\n\n"
    f"Wall time: **{record['train_seconds'] / 60:.1f} min** on {record['machine']['cpus']} CPU cores "
    f"({record['machine']['platform']}, torch {record['machine']['torch']}), "
    f"{record['tokens_seen']:,} tokens seen ({record['tokens_seen'] / record['train_tokens']:.1f} epochs "
    f"of {record['train_tokens']:,} training tokens)."
))
pd.Series(record["config"], name="setting").to_frame()

# %%
plotting.glue_figure("fig_loss_curve", plotting.training_curves(pd.DataFrame(record["loss_curve"])))

# %% [markdown]
# ```{glue:figure} fig_loss_curve
# :name: fig-card-loss
#
# Training curves of the embedded model: next-token loss (left) and the load-balancing loss,
# averaged over layers (right).
# ```
#
# ## 3. Quality: word-level perplexity on WikiText-2 test
#
# Perplexity per *word* (the corpus' own whitespace-separated words plus one end-of-line per
# line) is comparable across tokenizers. The baseline is a unigram model of the training split
# with add-one smoothing; the embedded model must reach at most 60% of its perplexity.

# %%
train_text, test_text = load_wikitext("train", wikitext_dir), load_wikitext("test", wikitext_dir)
quality = word_perplexity(lm, tokenizer, test_text, context=record["config"]["seq_len"])
unigram = unigram_word_perplexity(train_text, test_text)
ratio = quality["word_perplexity"] / unigram
assert abs(quality["word_perplexity"] / record["wikitext2_test"]["word_perplexity"] - 1) < 1e-3
assert ratio <= 0.6, f"the model is not well below the unigram baseline ({ratio:.2f})"
glue("word_ppl", quality["word_perplexity"], display=False)
glue("unigram_ppl", unigram, display=False)
glue("ppl_ratio_pct", ratio * 100, display=False)

harness = evaluate(lm, tokenizer, ["wikitext2_ppl"], data_dir=None, wikitext_dir=wikitext_dir,
                   max_length=record["config"]["seq_len"], batch_size=16)
harness_ppl = float(harness.query("metric == 'word_perplexity'").value.iloc[0])
glue("harness_word_ppl", harness_ppl, display=False)
pd.DataFrame({
    "word perplexity": [quality["word_perplexity"], harness_ppl, unigram],
    "how": [f"non-overlapping windows of {record['config']['seq_len']} tokens",
            f"lm-evaluation-harness, rolling windows of {record['config']['seq_len']} tokens, per article",
            "add-one unigram model of the training split"],
}, index=["embedded model (this page)", "embedded model (harness)", "unigram baseline"]).round(1)

# %% [markdown]
# The embedded model reaches a word-level perplexity of {glue:text}`word_ppl:.1f` on WikiText-2
# test, {glue:text}`ppl_ratio_pct:.0f`% of the unigram baseline's {glue:text}`unigram_ppl:.1f`
# (lm-evaluation-harness: {glue:text}`harness_word_ppl:.1f`). It is a small model: good enough
# for its routing to be learned, far from a useful language model.
#
# ## 4. Expert usage on WikiText-2 validation
#
# The share of each layer's routed slots (token x top-k choices) that each expert receives, on
# the validation split. A dead expert would show as a dark cell; the requirement is that none
# falls below 0.5% (the uniform share is 1/16 = 6.25%).

# %%
paragraphs = [line.strip() for line in load_wikitext("valid", wikitext_dir).split("\n")
              if line.strip() and not line.strip().startswith("=")]
valid_store = capture_routing(lm, tokenizer, paragraphs, out_dir=stage_paths(artifacts_dir).valid_store,
                              batch_size=32, max_length=record["config"]["seq_len"], overwrite=True,
                              data_spec={"dataset": "wikitext-2-v1", "split": "valid", "unit": "paragraph"})
usage = xm.expert_usage(valid_store)
glue("valid_tokens", valid_store.n_tokens, display=False)
glue("min_share_pct", float(usage.min() * 100), display=False)
glue("max_share_pct", float(usage.max() * 100), display=False)
assert usage.min() >= 0.005, "an expert receives less than 0.5% of its layer's slots"
plotting.glue_figure("fig_card_usage", plotting.expert_usage(usage, title="Expert usage on WikiText-2 valid"))

# %% [markdown]
# ```{glue:figure} fig_card_usage
# :name: fig-card-usage
#
# Share of routed slots per expert and layer on {glue:text}`valid_tokens` WikiText-2 validation
# tokens. Least used expert: {glue:text}`min_share_pct:.2f`%; most used:
# {glue:text}`max_share_pct:.2f`%.
# ```
#
# ## Summary
#
# - {glue:text}`total_params_m:.1f`M parameters ({glue:text}`active_params_m:.1f`M active per
#   token): {glue:text}`n_moe_layers` MoE layers x {glue:text}`n_experts_per_layer` experts,
#   top-{glue:text}`model_top_k`.
# - Trained in {glue:text}`train_minutes:.0f` minutes on a CPU; word-level perplexity
#   {glue:text}`word_ppl:.1f`, {glue:text}`ppl_ratio_pct:.0f`% of a unigram model's.
# - Every expert is used: the least used takes {glue:text}`min_share_pct:.2f`% of its layer's slots.
# - Licence: the weights are released with this project; the training data, WikiText-2, is
#   CC BY-SA 3.0.
