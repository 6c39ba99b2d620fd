"""The model card of a run's model (stage 0): what the study's later stages are about to read.

Stage 0 describes whichever model the profile names, so a run on a researcher's own checkpoint
opens with that checkpoint's card, and a run on a random model pays only for what such a model
can show. For every model: its MoE architecture as discovery reads it, its parameter counts
(total and active per token), its word-level perplexity on WikiText-2 test against a unigram
baseline, its accuracy on BLiMP's grammatical minimal pairs (:func:`blimp_accuracy`), and how
evenly each MoE layer spreads WikiText-2 validation tokens over its experts.
The embedded model adds its training record (``training.json`` next to its weights).

``max_paragraphs`` limits the WikiText-2 text read, for quick runs (the smoke profile); the card
says how much text its numbers rest on.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pandas as pd

from moe_utils.evaluation import blimp, paired
from moe_utils.evaluation.harness import run_harness, sample_table
from moe_utils.common.markup import code_span
from moe_utils.models.loading import EMBEDDED, EMBEDDED_DIR, RANDOM_PREFIX, moe_layers
from moe_utils.evaluation.wikitext import count_words, load_wikitext


def kind_of(name: str) -> str:
    """``"embedded"``, ``"random"`` (a randomly initialised architecture) or ``"checkpoint"``."""
    if name == EMBEDDED:
        return "embedded"
    return "random" if name.startswith(RANDOM_PREFIX) else "checkpoint"


def training_record() -> dict:
    """The embedded model's training record (command, machine, loss curve, parameter counts)."""
    return json.loads((EMBEDDED_DIR / "training.json").read_text())


def architecture_table(model, counts: dict, *, weights_path: Path | None = None) -> pd.DataFrame:
    """One column ``value`` of the facts that fix the model's shape, as the study reads it."""
    layers, config = moe_layers(model), model.config
    text_config = getattr(config, "text_config", None) or config
    experts = sorted({layer.num_experts for layer in layers})
    top_k = sorted({layer.top_k for layer in layers})
    rows = {
        "architecture": f"{type(model).__name__} (model type {config.model_type})",
        "MoE layers": f"{len(layers)} of {getattr(text_config, 'num_hidden_layers', len(layers))} decoder layers",
        "routed experts per MoE layer": ", ".join(map(str, experts)),
        "top-k": ", ".join(map(str, top_k)),
        "N_e (experts in X)": len(layers) * max(experts),
        "hidden size": getattr(text_config, "hidden_size", "n/a"),
        "vocabulary": getattr(text_config, "vocab_size", "n/a"),
        "parameters, total": f"{counts['total']:,}",
        "parameters, active per token": f"{counts['active_per_token']:,}",
        "parameters in routed experts": f"{counts['routed_experts']:,}",
    }
    if weights_path is not None and weights_path.is_file():
        rows["weights on disk"] = f"{weights_path.stat().st_size / 2**20:.1f} MiB (safetensors)"
    return pd.DataFrame({"value": [str(v) for v in rows.values()]}, index=list(rows))


def wikitext_text(split: str, wikitext_dir: str | os.PathLike | None = None,
                  max_paragraphs: int | None = None) -> str:
    """A WikiText-2 split as one string; with ``max_paragraphs``, only its first non-empty lines
    (headings included, as in the full split), so that words are counted the same way."""
    text = load_wikitext(split, wikitext_dir)
    if max_paragraphs is None:
        return text
    lines = [line for line in text.split("\n") if line.strip()]
    return "\n".join(lines[:max_paragraphs]) + "\n"


def paragraphs(text: str) -> list[str]:
    """The text's paragraphs: non-empty lines that are not ``= Heading =`` lines."""
    return [line.strip() for line in text.split("\n") if line.strip() and not line.strip().startswith("=")]


def text_extent(text: str) -> str:
    """How much text a number rests on, for the page: "N paragraphs, M words"."""
    return f"{len(paragraphs(text)):,} paragraphs, {count_words(text):,} words"


def blimp_accuracy(model, tokenizer, n_pairs: int | None, blimp_dir=None):
    """BLiMP through lm-evaluation-harness on the first ``n_pairs`` pairs of each paradigm:
    ``(accuracy per field and overall, macro accuracy with its 95% bootstrap interval over pairs
    resampled within paradigms, number of pairs)``."""
    raw = run_harness(model, tokenizer, [blimp.GROUP], limit=n_pairs, batch_size=64, log_samples=True,
                      bootstrap_iters=0, blimp_dir=blimp_dir)
    pairs = blimp.pair_table(sample_table(raw), blimp_dir)
    interval = paired.paired_difference("acc", 0 * pairs["correct"], pairs["correct"], strata=pairs["paradigm"])
    return blimp.macro_accuracy(pairs), interval, len(pairs)


def summary(name: str, counts: dict, layers: list, word_ppl: float, ratio: float, usage, record: dict | None, *,
            blimp: tuple | None = None) -> str:
    """The card's summary as Markdown bullets: size, quality against the unigram baseline, BLiMP accuracy
    (``blimp``: the interval of :func:`blimp_accuracy` and the number of pairs), expert usage (``usage``:
    each layer's share of routed slots per expert), and for the embedded model its training."""
    trained = f"Trained here in {record['train_seconds'] / 60:.0f} minutes on a CPU; w" if record else "W"
    lines = [
        f"- {code_span(name)}: {counts['total'] / 1e6:.1f}M parameters ({counts['active_per_token'] / 1e6:.1f}M active per "
        f"token), {len(layers)} MoE layers x {max(layer.num_experts for layer in layers)} experts, "
        f"top-{max(layer.top_k for layer in layers)}.",
        f"- {trained}ord-level perplexity {word_ppl:,.4g} on WikiText-2 test, {ratio:.3g} times a unigram model's.",
        f"- The least used expert takes {usage.min():.2%} of its layer's slots (uniform: {1 / usage.shape[1]:.2%}).",
    ]
    if blimp is not None:
        accuracy, n_pairs = blimp
        lines.insert(2, f"- BLiMP accuracy {accuracy.estimate:.1%} [{accuracy.low:.1%}, {accuracy.high:.1%}] on "
                        f"{n_pairs:,} minimal pairs (chance 50%).")
    if record:
        lines.append("- Licence: the weights are released with this project; the training data, WikiText-2, is "
                     "CC BY-SA 3.0.")
    return "\n".join(lines)
