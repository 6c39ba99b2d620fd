"""Several keep-masks in one forward pass (moe_utils.models.expert_surgery.row_masked_experts,
moe_utils.evaluation.multi_mask.MultiMaskLM), checked against independent truth: each block of a replicated
batch gives the logits of the model with that mask's experts physically removed, and the batched
scorer's answers equal the harness's own HFLM scoring each masked model one at a time."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from moe_utils.models.expert_surgery import PruningError, masked_experts, remove_experts, row_masked_experts
from moe_utils.models.loading import load_model, moe_layers


def _keeps(model, seed: int, n: int) -> list[np.ndarray]:
    """``n`` random keep-masks (the first keeps every expert), each layer keeping at least top-k."""
    rng = np.random.default_rng(seed)
    layers = moe_layers(model)
    width = max(layer.num_experts for layer in layers)
    out = [np.ones(len(layers) * width, dtype=bool)]
    for _ in range(n - 1):
        keep = np.zeros((len(layers), width), dtype=bool)
        for layer in layers:
            count = rng.integers(layer.top_k, layer.num_experts + 1)
            keep[layer.index, rng.choice(layer.num_experts, count, replace=False)] = True
        out.append(keep.reshape(-1))
    return out


@pytest.fixture(scope="module", params=["embedded", "random:qwen2_moe", "random:granitemoe"])
def model_and_tokenizer(request):
    torch.manual_seed(0)
    return load_model(request.param)


def test_each_block_of_rows_is_the_physically_pruned_model(model_and_tokenizer):
    model, _ = model_and_tokenizer
    keeps = _keeps(model, 1, 4)
    ids = torch.randint(1, min(model.config.vocab_size, 300), (3, 17))
    with torch.no_grad(), row_masked_experts(model, keeps):
        together = model(ids.repeat(len(keeps), 1)).logits.view(len(keeps), *ids.shape, -1)
    with torch.no_grad():
        for keep, block in zip(keeps, together):
            removed = remove_experts(copy.deepcopy(model), keep)
            torch.testing.assert_close(block, removed(ids).logits, rtol=1e-4, atol=1e-4)
            with masked_experts(model, keep):
                torch.testing.assert_close(block, model(ids).logits, rtol=1e-4, atol=1e-4)
        # the routers are the model's own again
        torch.testing.assert_close(together[0], model(ids).logits, rtol=1e-4, atol=1e-4)


def test_a_batch_that_is_not_one_block_per_mask_is_refused(model_and_tokenizer):
    model, _ = model_and_tokenizer
    keeps = _keeps(model, 2, 3)
    with torch.no_grad(), row_masked_experts(model, keeps), pytest.raises(PruningError, match="equal blocks"):
        model(torch.ones((4, 5), dtype=torch.long))


def test_the_scorer_answers_as_the_harness_does_one_mask_at_a_time(model_and_tokenizer):
    """Every (context, continuation) request, BLiMP-like pairs, one-token continuations sharing a
    context and windows longer than max_length: the batched answers for each mask equal those of
    lm-eval's own HFLM over the model with that mask applied."""
    from lm_eval.models.huggingface import HFLM

    from moe_utils.evaluation.multi_mask import MultiMaskLM

    model, tok = model_and_tokenizer
    keeps = _keeps(model, 3, 3)
    rng = np.random.default_rng(0)
    top = min(model.config.vocab_size, 300)
    requests = [(None, rng.integers(1, top, n).tolist(), rng.integers(1, top, m).tolist())
                for n, m in ((1, 9), (1, 12), (30, 1), (70, 40), (5, 3))]
    context = rng.integers(1, top, 20).tolist()
    requests += [(None, context, [int(c)]) for c in rng.integers(1, top, 4)]  # one context, four answers
    lm = MultiMaskLM(model, tok, keeps, batch_size=4, max_length=64, max_tokens=300)
    batched = []
    for index in range(len(keeps)):
        lm.select(index)
        batched.append(lm._loglikelihood_tokens(requests))
    assert lm.passes >= 2  # the token budget split the requests over several passes
    small = MultiMaskLM(model, tok, keeps, batch_size=4, max_length=64, max_tokens=100)  # < 3 masks x 64 tokens
    small.select(2)
    np.testing.assert_allclose([ll for ll, _ in small._loglikelihood_tokens(requests)],
                               [ll for ll, _ in batched[2]], rtol=1e-5, atol=1e-4)
    for keep, answers in zip(keeps, batched):
        with masked_experts(model, keep):
            alone = HFLM(pretrained=model, tokenizer=tok, batch_size=2, max_length=64)._loglikelihood_tokens(requests)
        assert [g for _, g in answers] == [g for _, g in alone]
        np.testing.assert_allclose([ll for ll, _ in answers], [ll for ll, _ in alone], rtol=1e-5, atol=1e-4)
    assert not np.allclose([ll for ll, _ in batched[0]], [ll for ll, _ in batched[1]])


def test_the_token_budget_shrinks_to_the_logit_budget(model_and_tokenizer, monkeypatch):
    """A real vocabulary makes a pass's logits large (granite: 8,192 positions are 1.6 GB): the budget of
    positions per pass is cut to LOGIT_ENTRIES logits (the smaller budget's answers are checked above)."""
    from moe_utils.evaluation import wikitext
    from moe_utils.evaluation.multi_mask import MultiMaskLM

    model, tok = model_and_tokenizer
    vocab = model.get_output_embeddings().weight.shape[0]
    assert MultiMaskLM(model, tok, _keeps(model, 3, 3), max_length=64, max_tokens=300).max_tokens == 300
    monkeypatch.setattr(wikitext, "LOGIT_ENTRIES", 100 * vocab)
    assert MultiMaskLM(model, tok, _keeps(model, 3, 3), max_length=64, max_tokens=300).max_tokens == 100
