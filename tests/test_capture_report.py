"""Stage 1's report on the captured routing (moe_utils.stages.capture): its numbers against counts
made by hand on stores whose routing is known, and the checks that refuse a broken store."""

from __future__ import annotations

import numpy as np
import pytest

from moe_utils.capture.store import RoutingStore
from moe_utils.stages import capture as capture_report

from .conftest import TEXTS
from .test_token_null import N_EXPERTS, PLANTED, make_store, synthetic_store


def _known_store() -> RoutingStore:
    """3 tokens, 2 layers of 8 experts, top-2: expert 0 of layer 0 and expert 3 of layer 1 go together twice."""
    indices = np.array([[[0, 1], [3, 4]],
                        [[0, 2], [3, 5]],
                        [[1, 2], [4, 5]]])
    return make_store(indices, np.array([7, 8, 7]), np.array([0, 0, 1]))


def test_store_summary_and_its_checks():
    store = _known_store()
    assert capture_report.store_summary(store, 2) == {"n_tokens": 3, "n_layers": 2, "n_experts": N_EXPERTS,
                                                      "top_k": 2, "n_rows": 2 * N_EXPERTS}
    with pytest.raises(RuntimeError, match="holds 2 prompts, not 3"):
        capture_report.store_summary(store, 3)
    store.manifest["model"]["n_experts"] = 5  # the store names expert 5 of a layer said to have 5
    with pytest.raises(RuntimeError, match="beyond the 5"):
        capture_report.store_summary(store, 2)


def test_usage_summary_counts_slots_by_hand():
    usage, values = capture_report.usage_summary(_known_store())
    # layer 0: experts 0, 1, 2 take 2 of 6 slots each; layer 1 the same for 3, 4, 5; all others none
    assert usage.shape == (2, N_EXPERTS) and np.allclose(usage.sum(axis=1), 1)
    assert values == {"min_usage_pct": 0.0, "max_usage_pct": pytest.approx(100 * 2 / 6)}


def test_coactivation_summary_names_the_pair_counted_by_hand():
    co, pairs, values = capture_report.coactivation_summary(_known_store(), n=3)
    # cross-layer pairs chosen together twice of 3 tokens: (L0E0, L1E3) and (L0E2, L1E5), (L0E1, L1E4)
    assert pairs["p_together"].tolist() == pytest.approx([2 / 3] * 3)
    assert values["top_pair_p"] == pytest.approx(2 / 3)
    # L0E0 is chosen for 2 tokens and L1E3 for 2: lift (2/3) / (2/3 * 2/3) = 1.5
    assert values["top_pair_lift"] == pytest.approx(1.5)
    assert values["top_pair"] == f"{pairs.expert_a[0]} with {pairs.expert_b[0]}"
    assert co.shape == (2 * N_EXPERTS, 2 * N_EXPERTS)


def test_coactivation_summary_refuses_a_layer_that_selects_fewer_than_k_experts():
    indices = np.array([[[0, 0], [3, 4]], [[0, 2], [3, 5]]])  # token 0 names expert 0 twice in layer 0
    with pytest.raises(RuntimeError, match="not top-k = 2"):
        capture_report.coactivation_summary(make_store(indices, np.array([1, 2]), np.array([0, 1])))


@pytest.fixture(scope="module")
def planted():
    store = synthetic_store(planted=True, n_questions=40, per_question=100, seed=1)
    co, _, _ = capture_report.coactivation_summary(store)
    return store, co


def test_token_control_finds_the_planted_context_pair(planted):
    store, co = planted
    coselection, pairs, values = capture_report.token_control(store, co, n_boot=20, seed=0)
    assert values["token_share"] + values["context_share"] == pytest.approx(100)
    assert values["token_share_low"] <= values["token_share"] <= values["token_share_high"]
    assert values["null_bootstrap"] == 20 and isinstance(values["finding_token_null"], str)
    assert values["null_replicates"] == capture_report.REPLICATES["exact"]  # a small store: exact replicates
    # the pair the context switches on stays above independence given the token ...
    (la, ea), (lb, eb) = PLANTED
    planted_pair = coselection.lift(given_token=True)[la * N_EXPERTS + ea, lb * N_EXPERTS + eb]
    assert planted_pair > 1.2
    # ... and the top pair's count is the number of tokens that select both, counted directly
    a, b = (int(s[1:s.index("E")]) * N_EXPERTS + int(s[s.index("E") + 1:])
            for s in values["null_top_pair"].split(" with "))
    picks = np.asarray(store.topk_indices)
    both = ((picks[:, a // N_EXPERTS] == a % N_EXPERTS).any(axis=1)
            & (picks[:, b // N_EXPERTS] == b % N_EXPERTS).any(axis=1)).sum()
    assert values["top_pair_observed"] == both
    maps = capture_report.lift_maps(coselection)
    assert list(maps) == ["plain (independent layers)", "given the token (independent layers given the token id)"]


def test_token_control_refuses_counts_that_are_not_fig_2s(planted):
    store, co = planted
    with pytest.raises(RuntimeError, match="differ from the co-activation"):
        capture_report.token_control(store, co * 1.1, n_boot=5)


def test_capture_describes_and_checks_a_real_model(olmoe, tmp_path):
    model, tok = olmoe
    labels = ["math", "law", "math", "law", "math", "law", "math"]
    text, values = capture_report.describe_inputs("random:`olmoe", model, labels, categories=["math", "law"],
                                                  n_per_category=3, seed=4)
    assert values == {"model_name": "random:`olmoe", "n_questions": 7, "n_categories": 2}
    n_params = sum(p.numel() for p in model.parameters()) / 1e6
    assert f"{n_params:.1f}M parameters" in text
    assert "``random:`olmoe``" in text  # a code span that the name's backtick cannot close
    store, values = capture_report.capture(model, tok, TEXTS, labels, tmp_path / "store", categories=["math", "law"],
                                           n_per_category=3, seed=4, batch_size=3, max_length=32)
    assert store.n_samples == len(TEXTS) and values == capture_report.store_summary(store, len(TEXTS))
    assert store.manifest["data"]["categories"] == ["math", "law"] and store.manifest["data"]["seed"] == 4
    again = RoutingStore.open(tmp_path / "store")
    assert again.n_tokens == store.n_tokens
