"""A broken model (one NaN in its weights) stops the run with a message naming the layer or task,
instead of a store of NaN weights, a perplexity of nan or 100% on BLiMP (issue 26, case 4)."""

from __future__ import annotations

import pytest
import torch

from moe_utils.stages import model_card
from moe_utils.models.loading import NonFiniteError, load_model, moe_layers
from moe_utils.capture.routing import capture_routing
from moe_utils.evaluation.wikitext import word_perplexity

from .conftest import SHARED_DATA, TEXTS


@pytest.fixture()
def broken_router():
    """A tiny OLMoE whose second MoE layer's router has one NaN weight."""
    model, tokenizer = load_model("random:olmoe", device="cpu")
    with torch.no_grad():
        next(moe_layers(model)[1].router.parameters())[0, 0] = float("nan")
    return model, tokenizer


def test_capture_refuses_a_router_that_gives_nan(broken_router, tmp_path):
    model, tokenizer = broken_router
    with pytest.raises(NonFiniteError, match=r"^MoE layer 1 \(decoder layer 1\): the router gave non-finite"):
        capture_routing(model, tokenizer, TEXTS, out_dir=tmp_path / "store", progress=False)
    assert not (tmp_path / "store" / "manifest.json").exists()  # no store claims to be finished


def test_a_healthy_model_captures(olmoe, tmp_path):
    model, tokenizer = olmoe
    store = capture_routing(model, tokenizer, TEXTS, out_dir=tmp_path / "store", progress=False)
    assert store.n_tokens > 0


def test_perplexity_of_a_nan_model_is_an_error(broken_router):
    model, tokenizer = broken_router
    with pytest.raises(NonFiniteError, match="WikiText-2 perplexity"):
        word_perplexity(model, tokenizer, "a b c d e f g h " * 40, context=16)


@pytest.mark.skipif(not (SHARED_DATA / "blimp").is_dir(), reason="needs the local BLiMP copy")
def test_blimp_of_a_nan_model_is_an_error_not_100_percent(broken_router):
    model, tokenizer = broken_router
    with pytest.raises(NonFiniteError, match=r"task blimp_\w+, document \d+: the model's log-likelihood is nan"):
        model_card.blimp_accuracy(model, tokenizer, 2, SHARED_DATA / "blimp")
