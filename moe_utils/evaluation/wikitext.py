"""WikiText-2: the corpus the embedded model is trained on, and word-level language-model quality.

The embedded model (see :mod:`moe_utils.models.tiny_moe`) never sees MMLU or MMLU-Pro text: the study
evaluates on MMLU-Pro, so its training corpus is WikiText-2 (CC BY-SA 3.0). This module reads the
corpus from a local directory (``train.txt``, ``valid.txt``, ``test.txt``, the standard tokenized
release) or from the Hugging Face Hub (``wikitext``, ``wikitext-2-v1``), and computes the two
numbers the model card reports: word-level perplexity of a causal LM, and that of a unigram model,
the baseline the model must beat.
"""

from __future__ import annotations

import collections
import logging
import math
import os
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from moe_utils.models.loading import NonFiniteError
from moe_utils.common.data_env import WIKITEXT_ENV

log = logging.getLogger(__name__)

SPLITS = ("train", "valid", "test")
_HUB_SPLIT = {"train": "train", "valid": "validation", "test": "test"}


def load_wikitext(split: str, data_dir: str | os.PathLike | None = None) -> str:
    """Return one WikiText-2 split as a single string, paragraphs separated by newlines.

    ``data_dir`` (or ``$MOE_WIKITEXT_DIR``) is a directory with ``<split>.txt``; with neither, the
    split comes from the Hub (``wikitext``, ``wikitext-2-v1``).
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    data_dir = data_dir or os.environ.get(WIKITEXT_ENV)
    if data_dir:
        path = Path(data_dir) / f"{split}.txt"
        if not path.is_file():
            raise FileNotFoundError(
                f"WikiText-2 split {split!r} not found at {path}. Point data_dir or ${WIKITEXT_ENV} at a "
                "directory holding train.txt, valid.txt and test.txt, or unset it to read from the Hub."
            )
        return path.read_text(encoding="utf-8")
    from datasets import load_dataset

    rows = load_dataset("wikitext", "wikitext-2-v1", split=_HUB_SPLIT[split])
    return "".join(rows["text"])


def count_words(text: str) -> int:
    """Words as WikiText counts them: whitespace-separated tokens plus one end-of-line per line."""
    lines = [line for line in text.split("\n") if line.strip()]
    return sum(len(line.split()) + 1 for line in lines)


def unigram_word_perplexity(train_text: str, test_text: str) -> float:
    """Word-level perplexity of an add-one-smoothed unigram model fitted on ``train_text``.

    End-of-line counts as a word (as in :func:`count_words`), so the denominator matches the
    causal LM's word-level perplexity.
    """

    def words(text: str) -> list[str]:
        out: list[str] = []
        for line in text.split("\n"):
            if line.strip():
                out.extend(line.split())
                out.append("<eol>")
        return out

    counts = collections.Counter(words(train_text))
    total, vocab = sum(counts.values()), len(counts) + 1  # +1: mass reserved for unseen words
    test_words = words(test_text)
    nll = -sum(math.log((counts.get(w, 0) + 1) / (total + vocab)) for w in test_words)
    return math.exp(nll / len(test_words))


#: Most logits (rows x tokens x vocabulary) :func:`word_perplexity` and the harness (:func:`logit_batch_size`)
#: compute at once: 256 MB in float32.
LOGIT_ENTRIES = 2**26


def logit_batch_size(model, batch_size: int, length: int) -> int:
    """``batch_size``, or fewer rows where the logits of ``batch_size`` rows of ``length`` tokens would exceed
    :data:`LOGIT_ENTRIES` (a real vocabulary makes them large: 16 windows of 512 tokens over granite's 49k
    tokens are 1.6 GB in float32, twice that with the loss's log-softmax); at least 1."""
    return max(1, min(batch_size, LOGIT_ENTRIES // (length * model.get_output_embeddings().weight.shape[0])))


@torch.no_grad()
def word_perplexity(model, tokenizer, text: str, *, context: int = 256, batch_size: int = 16) -> dict:
    """Word-level perplexity of a causal LM on ``text`` (non-overlapping windows of ``context``).

    Returns ``{"word_perplexity", "token_perplexity", "n_words", "n_tokens"}``: the summed token
    negative log-likelihood divided by the number of words (:func:`count_words`) or of tokens.
    At most ``batch_size`` windows run together, fewer where their logits would exceed
    :data:`LOGIT_ENTRIES` (:func:`logit_batch_size`).
    """
    ids = np.asarray(tokenizer(text)["input_ids"], dtype=np.int64)
    n_windows = (len(ids) - 1) // context
    if n_windows == 0:
        raise ValueError(f"text has {len(ids)} tokens, fewer than one window of {context}")
    device = next(model.parameters()).device
    batch_size = logit_batch_size(model, batch_size, context)
    windows = torch.from_numpy(ids[: n_windows * context + 1])
    nll, n_tok = 0.0, 0
    was_training = model.training
    model.eval()
    for start in tqdm(range(0, n_windows, batch_size), desc="perplexity", leave=False):
        rows = range(start, min(start + batch_size, n_windows))
        inp = torch.stack([windows[r * context : (r + 1) * context] for r in rows]).to(device)
        tgt = torch.stack([windows[r * context + 1 : (r + 1) * context + 1] for r in rows]).to(device)
        logits = model(input_ids=inp).logits.float()
        nll += torch.nn.functional.cross_entropy(logits.flatten(0, 1), tgt.flatten(), reduction="sum").item()
        n_tok += tgt.numel()
    model.train(was_training)
    if not math.isfinite(nll):
        raise NonFiniteError(f"WikiText-2 perplexity: the model's log-likelihood is {nll} (NaN or inf); its weights "
                             "are broken, check the checkpoint")
    # Words in the evaluated span only, in proportion to the tokens covered.
    n_words = count_words(text) * n_tok / (len(ids) - 1)
    return {
        "word_perplexity": math.exp(nll / n_words),
        "token_perplexity": math.exp(nll / n_tok),
        "n_words": round(n_words),
        "n_tokens": n_tok,
    }
