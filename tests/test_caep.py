"""CAEP and per-layer masks (moe_utils.compression.caep): Algorithm 1 against hand-computed cases and a
brute-force loop written independently, the per-layer guard, layer quotas and random masks."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.sparse as sp

from moe_utils.compression import caep


# ------------------------------------------------------------------------------------ CAEP
def reference_caep(D, R, k1, k2):
    """Algorithm 1 as the paper states it, with Python lists and exact sums (no numpy algebra)."""
    D, R = np.asarray(D).tolist(), np.asarray(R).tolist()
    n_e, n_p = len(D), len(D[0])
    usage = [math.fsum(row) for row in R]

    def contribution(atoms):
        return [math.fsum(D[i][j] * usage[j] for j in atoms) for i in range(n_e)]

    alive = list(range(n_p))
    e = contribution(alive)
    f = sorted(e, reverse=True)[math.ceil(k1 * n_e) - 1]
    m = [x >= f for x in e]
    removed = []
    while sum(m) > (1 - k2) * n_e and alive:
        j = min(alive, key=lambda a: (usage[a], a))
        alive.remove(j)
        removed.append(j)
        m = [x >= f for x in contribution(alive)]
    return np.array(m), removed


def test_caep_hand_computed_loop():
    D = [[1, 0, 0], [1, 1, 0], [0, 1, 0], [0, 0, 1]]
    R = [[1, 0], [1, 1], [2, 2]]  # usage 1, 2, 4 -> e = 1, 3, 2, 4; k1 = 0.75: f = 2 (rank 3)
    result = caep.caep(D, R, 0.75, 0.5)
    assert result.threshold == 2.0
    np.testing.assert_array_equal(result.contribution, [1, 3, 2, 4])
    # m = [F T T T] (3 > 2): drop atom 0 -> e = 0 2 2 4, still 3; drop atom 1 -> e = 0 0 0 4
    np.testing.assert_array_equal(result.keep, [False, False, False, True])
    assert result.atoms_removed.tolist() == [0, 1] and result.reached and result.guard is None


def test_caep_ties_go_to_the_lowest_index():
    # two atoms used equally: the first one goes; the other tie-break would keep expert 0 instead
    result = caep.caep([[1, 0], [0, 1], [0, 0]], [[1.0], [1.0]], 0.5, 0.5)
    np.testing.assert_array_equal(result.keep, [False, True, False])
    assert result.atoms_removed.tolist() == [0]


def test_caep_threshold_keeps_ties_and_loop_may_not_run():
    D = np.diag([3.0, 2.0, 2.0, 1.0])
    result = caep.caep(D, np.ones((4, 1)), 0.5, 0.25)  # rank 2 -> f = 2; both 2s kept; 3 <= 3
    assert result.threshold == 2.0
    np.testing.assert_array_equal(result.keep, [True, True, True, False])
    assert len(result.atoms_removed) == 0


def test_caep_atoms_running_out():
    # f = 0 (an expert contributes nothing): e >= f for every expert whatever is removed
    result = caep.caep(np.diag([0.0, 1.0, 2.0]), sp.csr_matrix(np.ones((3, 2))), 0.99, 0.5)
    assert result.threshold == 0.0 and not result.reached
    assert result.keep.all() and result.atoms_removed.tolist() == [0, 1, 2]
    assert "ran out" in result.note


def test_caep_guard_restores_and_compensates():
    # e = 1..6; k1 = 0.99 -> f = 1; atoms 0, 1, 2 go -> layer 0 empty, layer 1 full
    D, R = np.eye(6), np.arange(1.0, 7.0)[:, None]
    bare = caep.caep(D, R, 0.99, 0.5)
    np.testing.assert_array_equal(bare.keep, [False, False, False, True, True, True])
    guarded = caep.caep(D, R, 0.99, 0.5, budget=caep.PruningBudget((3, 3), 1))
    np.testing.assert_array_equal(guarded.keep, [False, False, True, False, True, True])
    np.testing.assert_array_equal(guarded.algorithm_keep, bare.keep)
    assert guarded.guard.restored == ["L0E2"] and guarded.guard.dropped == ["L1E0"]
    assert guarded.guard.short_layers == {0: 0} and "restored L0E2" in guarded.note


def test_guard_grows_the_budget_only_when_no_layer_has_room():
    keep, note = caep.guard_min_per_layer([False, False, True, False], [1.0, 3.0, 2.0, 4.0], caep.PruningBudget((2, 2), 1))
    np.testing.assert_array_equal(keep, [False, True, True, False])
    assert note.restored == ["L0E1"] and note.dropped == []
    assert "1 more experts kept" in str(note)
    unchanged, quiet = caep.guard_min_per_layer([True, False, True, False], [1, 1, 1, 1], caep.PruningBudget((2, 2), 1))
    assert not quiet.changed and unchanged.tolist() == [True, False, True, False]


@pytest.mark.parametrize("trial", range(40))
def test_caep_matches_the_brute_force_loop(trial):
    rng = np.random.default_rng(trial)
    n_e, n_p, n_s = rng.integers(4, 30), rng.integers(1, 25), rng.integers(1, 12)
    D = rng.random((n_e, n_p)) * (rng.random((n_e, n_p)) < 0.3)
    R = rng.random((n_p, n_s)) * (rng.random((n_p, n_s)) < 0.5)
    k1, k2 = rng.uniform(0.05, 0.99), rng.uniform(0.05, 0.95)
    expected_keep, expected_removed = reference_caep(D, R, k1, k2)
    if not expected_keep.any():  # the loop ends with no expert: an error, not an empty mask
        with pytest.raises(ValueError, match="keeps no expert"):
            caep.caep(D, sp.csr_matrix(R) if trial % 2 else R, k1, k2)
        return
    result = caep.caep(D, sp.csr_matrix(R) if trial % 2 else R, k1, k2)
    np.testing.assert_array_equal(result.keep, expected_keep)
    assert result.atoms_removed.tolist() == expected_removed


def test_caep_rejects_bad_inputs():
    with pytest.raises(ValueError, match="threshold_ratio"):
        caep.caep(np.eye(2), np.ones((2, 1)), 1.0, 0.5)
    with pytest.raises(ValueError, match="negative"):
        caep.caep(-np.eye(2), np.ones((2, 1)), 0.5, 0.5)
    with pytest.raises(ValueError, match="N_p"):
        caep.caep(np.eye(2), np.ones((3, 1)), 0.5, 0.5)
    with pytest.raises(ValueError, match="sum to"):
        caep.caep(np.eye(4), np.ones((4, 1)), 0.5, 0.5, budget=caep.PruningBudget((2, 1), 1))


@pytest.mark.parametrize("args, message", [
    (((),), "non-empty"), (((2, 0),), "positive"), (((2.5, 2),), "positive"), (((2, 2), 3), "min_per_layer=3"),
    (((2, 2), -1), "min_per_layer=-1"), (((2, 2), 0, [[1, 2]]), "allowed has 1 entries"),
])
def test_a_budget_that_cannot_hold_is_refused(args, message):
    with pytest.raises(ValueError, match=message):
        caep.PruningBudget(*args)


def test_budget_of_a_model_reads_its_layers(random_models):
    from moe_utils.models.expert_surgery import allowed_counts
    from moe_utils.models.loading import moe_layers

    for name in ("olmoe", "deepseek_v3"):
        model, _ = random_models[name]
        layers = moe_layers(model)
        budget = caep.PruningBudget.for_model(model, layers)
        assert budget.layer_sizes == tuple(layer.num_experts for layer in layers)
        assert budget.min_per_layer == max(layer.top_k for layer in layers)
        assert [None if r is None else list(r) for r in budget.allowed] == allowed_counts(model)
        assert budget.restricted == (name == "deepseek_v3")
        assert caep.PruningBudget.for_model(model, min_per_layer=1).min_per_layer == 1


# ------------------------------------------------------------------------ per-layer masks
def test_layerwise_mask_quota_ties_and_guard():
    scores = np.array([5, 1, 1, 3, 2, 0, 9, 9], dtype=float)
    four = caep.PruningBudget((4, 4))
    assert four.quota(0.5).tolist() == [2, 2]
    assert caep.PruningBudget((6,)).quota(0.25).tolist() == [4]  # 1.5 experts rounds up to 2 pruned
    keep = caep.layerwise_mask(scores, four, 0.25)  # one per layer; the tie 1, 1: expert 1 goes
    np.testing.assert_array_equal(keep, [True, False, True, True, True, False, True, True])
    np.testing.assert_array_equal(caep.layerwise_mask(scores, four, 0.5),
                                  [True, False, False, True, False, False, True, True])
    guarded = caep.PruningBudget((4, 4), 2)
    assert caep.layerwise_mask(scores, guarded, 0.75).sum() == 4  # guard: 2 per layer, not 1
    assert guarded.quota(0.75, guard=False).tolist() == [1, 1]
    eight = caep.PruningBudget((8, 8))
    a, b = (caep.random_mask(eight, 0.5, seed) for seed in (0, 1))
    assert eight.kept_per_layer(a).tolist() == [4, 4] and not np.array_equal(a, b)
    np.testing.assert_array_equal(a, caep.random_mask(eight, 0.5, 0))


# ------------------------------------------------------- group-limited routers (allowed counts)
def test_round_up_to_allowed_restores_each_layers_best_pruned_experts():
    # layer 0 keeps 1 (allowed: 2 or 4) -> its best pruned expert returns; layer 1 keeps 2, allowed
    keep, restored = caep.round_up_to_allowed([True, False, False, False, True, True, False, False],
                                              [9, 1, 5, 5, 0, 0, 7, 7], caep.PruningBudget((4, 4), 0, [[2, 4], None]))
    np.testing.assert_array_equal(keep, [True, False, True, False, True, True, False, False])
    assert restored == ["L0E2"]  # the tie 5, 5 goes to the lowest row
    unchanged, none = caep.round_up_to_allowed([True, True, False, False], [1, 1, 1, 1],
                                               caep.PruningBudget((4,), 0, [[2, 4]]))
    assert none == [] and unchanged.tolist() == [True, True, False, False]
    with pytest.raises(ValueError, match="2 entries"):
        caep.PruningBudget((4,), 0, [[2, 4], None])


def test_quotas_and_caep_keep_only_allowed_counts():
    allowed = [[2, 4, 6], [2, 4, 6]]
    budget, plain_budget = caep.PruningBudget((6, 6), 2, allowed), caep.PruningBudget((6, 6), 2)
    assert plain_budget.quota(0.5).tolist() == [3, 3]
    assert budget.quota(0.5).tolist() == [4, 4]  # rounded up, never down
    assert budget.kept_per_layer(caep.random_mask(budget, 0.5, 0)).tolist() == [4, 4]
    rng = np.random.default_rng(3)
    D, R = rng.random((12, 5)), rng.random((5, 40))
    for ratio in (0.25, 0.5, 0.75):
        result = caep.caep(D, R, 0.9, ratio, budget=budget)
        plain = caep.caep(D, R, 0.9, ratio, budget=plain_budget)
        counts = budget.kept_per_layer(result.keep)
        assert all(c in (2, 4, 6) for c in counts)
        assert (result.keep >= plain.keep).all()  # only restores
        assert len(result.rounded) == int(result.keep.sum() - plain.keep.sum())
        assert ("group-limited router" in result.note) == bool(result.rounded)


def test_caep_refuses_nan_input_instead_of_keeping_nothing():
    D = np.eye(3)
    D[1, 1] = np.nan
    with pytest.raises(ValueError, match="D holds NaN"):
        caep.caep(D, np.ones((3, 2)), 0.5, 0.5)
    R = np.ones((3, 2))
    R[0, 0] = np.nan
    with pytest.raises(ValueError, match="R holds NaN"):
        caep.caep(np.eye(3), R, 0.5, 0.5)
    with pytest.raises(ValueError, match="R holds NaN"):
        caep.caep(np.eye(3), sp.csr_matrix(R), 0.5, 0.5)


def test_caep_refuses_a_ratio_that_leaves_no_expert():
    # every expert sits on one shared atom: removing it (the loop's only move) drops them all
    with pytest.raises(ValueError, match="CAEP keeps no expert at all"):
        caep.caep(np.ones((4, 1)), np.ones((1, 3)), 0.99, 0.5)
    guarded = caep.caep(np.ones((4, 1)), np.ones((1, 3)), 0.99, 0.5,
                        budget=caep.PruningBudget((2, 2), min_per_layer=1))
    assert caep.PruningBudget((2, 2), min_per_layer=1).kept_per_layer(guarded.keep).min() >= 1
