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
# # Model card
#
# *Which model does this run study, and how good a language model is it?*
#
# This page describes the model of the run's profile, the one every later stage captures,
# factorises and prunes. With the default profile that is the **embedded model**: a small
# OLMoE-style MoE {cite}`muennighoff2024olmoe` (softmax top-k routing, no shared experts) in
# transformers' own `OlmoeForCausalLM`, trained here on WikiText-2 {cite}`merity2016pointer` and
# shipped with the package. It loads with plain `AutoModelForCausalLM.from_pretrained` and goes
# through exactly the same capture, pruning and evaluation code as a Hub checkpoint, and it has
# never seen MMLU or MMLU-Pro text, which the study evaluates on.
#
# **What you will see:** the model's architecture and size as the study reads it; how it was
# trained (for the embedded model: command, time, loss curve, read from `training.json` next to
# its weights); how good a language model it is (word-level perplexity on WikiText-2 test against
# a unigram baseline, measured here and through lm-evaluation-harness {cite}`eval-harness`); its
# accuracy on BLiMP's grammatical minimal pairs; and how evenly it uses its experts. Everything else on this page is recomputed by this run.

# %% tags=["parameters"]
model = "embedded"
device = None
dtype = None
trust_remote_code = False
max_length = 512
wikitext_dir = None
blimp_dir = None
blimp_pairs = 100  # per BLiMP paradigm
card_paragraphs = None
artifacts_dir = "artifacts/tiny"

# %% tags=["hide-input"]
import matplotlib.pyplot as plt
import pandas as pd
from IPython.display import Markdown, display
from myst_nb import glue

from moe_utils.patterns import expert_matrix as xm
from moe_utils.stages import model_card
from moe_utils.common import plotting
from moe_utils.evaluation.harness import evaluate
from moe_utils.common.markup import code_span
from moe_utils.models.loading import EMBEDDED_DIR, load_model, moe_layers, parameter_counts
from moe_utils.capture.routing import capture_routing
from moe_utils.stages import stage_paths
from moe_utils.evaluation.wikitext import unigram_word_perplexity, word_perplexity

plotting.use_style()
kind = model_card.kind_of(model)
record = model_card.training_record() if kind == "embedded" else None
lm, tokenizer = load_model(model, device=device, dtype=dtype, trust_remote_code=trust_remote_code)
layers = moe_layers(lm)
context = record["config"]["seq_len"] if record else max_length

# %% [markdown]
# ## 1. Architecture

# %%
counts = parameter_counts(lm)
if record:
    assert counts == record["parameters"], "the shipped weights do not match their training record"
glue("model_name", model, display=False)
glue("total_params_m", counts["total"] / 1e6, display=False)
glue("active_params_m", counts["active_per_token"] / 1e6, display=False)
glue("n_moe_layers", len(layers), display=False)
glue("n_experts_per_layer", max(layer.num_experts for layer in layers), display=False)
glue("model_top_k", max(layer.top_k for layer in layers), display=False)
if kind == "random":
    display(Markdown(f"**{code_span(model)} is a randomly initialised model built from its architecture's config: "
                     "its routing is noise and its perplexity that of an untrained model. Nothing on "
                     "this page is a finding about the architecture.**"))
model_card.architecture_table(lm, counts, weights_path=EMBEDDED_DIR / "model.safetensors" if record else None)

# %% [markdown]
# ## 2. Training
#
# The embedded model was trained on the WikiText-2 training split (CC BY-SA 3.0, about 2 million
# words of Wikipedia articles), with a byte-level BPE tokenizer trained on the same split. The
# loss is next-token cross-entropy plus a load-balancing auxiliary loss per layer, which keeps
# every expert in use. Another model's training is described by its own card.

# %%
if record:
    glue("train_minutes", record["train_seconds"] / 60, display=False)
    display(Markdown(
        f"Command (seeded, reproducible):\n\n```bash\n{record['command']}\n```\n\n"
        f"Wall time: **{record['train_seconds'] / 60:.1f} min** on {record['machine']['cpus']} CPU cores "
        f"({record['machine']['platform']}, torch {record['machine']['torch']}), "
        f"{record['tokens_seen']:,} tokens seen ({record['tokens_seen'] / record['train_tokens']:.1f} epochs "
        f"of {record['train_tokens']:,} training tokens)."))
    display(pd.Series(record["config"], name="setting").to_frame())
    figure = plotting.training_curves(pd.DataFrame(record["loss_curve"]))
    display(figure)
    plt.close(figure)
    display(Markdown("*Training curves: next-token loss (left) and the load-balancing loss, averaged "
                     "over layers (right).*"))
else:
    glue("train_minutes", float("nan"), display=False)
    display(Markdown(f"{code_span(model)} was not trained by this project: no training record."))

# %% [markdown]
# ## 3. Quality: word-level perplexity on WikiText-2 test
#
# Perplexity per *word* (the corpus' own whitespace-separated words plus one end-of-line per
# line) is comparable across tokenizers. The baseline is a unigram model of the training split
# with add-one smoothing; the embedded model must reach at most 60% of its perplexity. A profile
# may limit the text (`card_paragraphs`) for a quick run; the extent is stated below.

# %%
test_text = model_card.wikitext_text("test", wikitext_dir, card_paragraphs)
quality = word_perplexity(lm, tokenizer, test_text, context=context)
unigram = unigram_word_perplexity(model_card.wikitext_text("train", wikitext_dir), test_text)
ratio = quality["word_perplexity"] / unigram
if record and card_paragraphs is None:
    assert abs(quality["word_perplexity"] / record["wikitext2_test"]["word_perplexity"] - 1) < 1e-3
    assert ratio <= 0.6, f"the model is not well below the unigram baseline ({ratio:.2f})"
glue("word_ppl", quality["word_perplexity"], display=False)
glue("unigram_ppl", unigram, display=False)
glue("ppl_ratio_pct", ratio * 100, display=False)
glue("test_extent", model_card.text_extent(test_text), display=False)
rows = {"this model (this page)": [f"{quality['word_perplexity']:,.1f}", f"non-overlapping windows of {context} tokens"]}
if kind != "random":  # a second implementation's view of an untrained model adds nothing
    harness = evaluate(lm, tokenizer, ["wikitext2_ppl"], wikitext_dir=wikitext_dir, max_length=context,
                       batch_size=16, limit=None if card_paragraphs is None else 1)
    harness_ppl = float(harness.query("metric == 'word_perplexity'").value.iloc[0])
    rows["this model (lm-evaluation-harness)"] = [
        f"{harness_ppl:,.1f}",
        f"rolling windows of {context} tokens, per article" + ("" if card_paragraphs is None else ", first article")]
rows["unigram baseline"] = [f"{unigram:,.1f}", "add-one unigram model of the training split"]
pd.DataFrame(rows, index=["word perplexity", "how"]).T

# %% [markdown]
# This model's word-level perplexity on WikiText-2 test ({glue:text}`test_extent`) is
# {glue:text}`word_ppl:.1f`, {glue:text}`ppl_ratio_pct:.0f`% of the unigram baseline's
# {glue:text}`unigram_ppl:.1f`. The embedded model is small: good enough for its routing to be
# learned, far from a useful language model.
#
# ## 4. Quality: grammatical judgements on BLiMP
#
# BLiMP {cite}`warstadt2020blimp` holds minimal pairs of English sentences, one grammatical and
# one not, in 67 paradigms grouped into four fields; a model is right on a pair when it gives the
# grammatical sentence the higher total log-probability (chance: 50%). Scored through
# lm-evaluation-harness's `blimp_<paradigm>` tasks, on the first {glue:text}`blimp_pairs` pairs of
# each paradigm; accuracy is the mean over paradigms, with a 95% bootstrap interval over pairs
# (resampled within paradigms). This is the accuracy task of the pruning stage.

# %%
by_field, acc, n_pairs = model_card.blimp_accuracy(lm, tokenizer, blimp_pairs, blimp_dir)
for name, value in {"blimp_pairs": blimp_pairs, "blimp_n": n_pairs, "blimp_acc": acc.estimate * 100,
                    "blimp_low": acc.low * 100, "blimp_high": acc.high * 100}.items():
    glue(name, value, display=False)
(by_field * 100).round(1).rename("accuracy (%)").to_frame()

# %% [markdown]
# On {glue:text}`blimp_n` pairs this model is right on {glue:text}`blimp_acc:.1f`% (95% interval
# {glue:text}`blimp_low:.1f` to {glue:text}`blimp_high:.1f`; chance 50%), overall (`all`) and per
# field above. The embedded model is clearly above chance and far from perfect, so pruning damage
# has room to show.
#
# ## 5. Expert usage on WikiText-2 validation
#
# The share of each layer's routed slots (token x top-k choices) that each expert receives, on
# the validation split. A dead expert would show as a dark cell; for the embedded model the
# requirement is that none falls below 0.5% (the uniform share is 1/E).

# %%
valid_text = model_card.wikitext_text("valid", wikitext_dir, card_paragraphs)
valid_store = capture_routing(lm, tokenizer, model_card.paragraphs(valid_text),
                              out_dir=stage_paths(artifacts_dir).valid_store, batch_size=32,
                              max_length=context, overwrite=True,
                              data_spec={"dataset": "wikitext-2-v1", "split": "valid", "unit": "paragraph"})
usage = xm.expert_usage(valid_store)
glue("valid_tokens", valid_store.n_tokens, display=False)
glue("min_share_pct", float(usage.min() * 100), display=False)
glue("max_share_pct", float(usage.max() * 100), display=False)
if record:
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

# %%
display(Markdown(model_card.summary(model, counts, layers, quality["word_perplexity"], ratio, usage, record,
                                    blimp=(acc, n_pairs))))
