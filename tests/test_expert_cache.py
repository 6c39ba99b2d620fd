"""The offloading simulation against an independent, one-access-at-a-time replay of the protocol."""

from __future__ import annotations

import numpy as np
import pytest

from moe_utils.prediction.expert_cache import compare, simulate


def _replay(topk, prefetch, layer, size):
    """The protocol of moe_utils.prediction.expert_cache, written plainly: a list ordered from least to most
    recently used, for one layer and one cache size."""
    cache: list[int] = []
    hits = prefetch_loads = miss_loads = 0

    def access(expert):
        if expert in cache:
            cache.remove(expert)
            cache.append(expert)
            return True
        if len(cache) == size:
            cache.pop(0)
        cache.append(expert)
        return False

    for token in range(len(topk)):
        if prefetch is not None:
            for expert in prefetch[token, layer]:
                if expert >= 0 and not access(int(expert)):
                    prefetch_loads += 1
        for expert in topk[token, layer]:
            if access(int(expert)):
                hits += 1
            else:
                miss_loads += 1
    return hits, prefetch_loads, miss_loads


def _trace(rng, n_tokens, n_layers, n_experts, k):
    return np.stack([np.stack([rng.choice(n_experts, size=k, replace=False) for _ in range(n_layers)])
                     for _ in range(n_tokens)])


def test_simulation_matches_a_brute_force_replay():
    rng = np.random.default_rng(0)
    n_experts, k = 6, 2
    topk = _trace(rng, 60, 3, n_experts, k)
    guess = _trace(rng, 60, 3, n_experts, 3)
    guess[rng.random(guess.shape[:2]) < 0.2] = -1  # some tokens and layers get no prediction
    prefetchers = {"LRU alone": None, "guess": guess, "truth": topk}
    frame = simulate(topk, prefetchers, [0, 1, 2], range(k, n_experts + 1), n_experts)
    assert len(frame) == 3 * 3 * (n_experts - k + 1)
    for row in frame.itertuples():
        expected = _replay(topk, prefetchers[row.strategy], row.layer, row.cache_size)
        assert (row.hits, row.prefetch_loads, row.miss_loads) == expected, row
        assert row.loads == expected[1] + expected[2]


def test_a_hand_computed_trace():
    # one layer, E = 3, k = 1, cache of 1: requests 0, 0, 1, 0
    topk = np.array([[[0]], [[0]], [[1]], [[0]]])
    alone = simulate(topk, {"lru": None}, [0], [1], 3).iloc[0]
    assert (alone.hits, alone.miss_loads, alone.prefetch_loads) == (1, 3, 0)
    # prefetching expert 1 every time: 1 is loaded (evicting 0), then 0 is missed and evicts 1;
    # at the third token 1 is requested (a hit), and the fourth token's prefetch finds it resident
    always_one = np.ones_like(topk)
    fetched = simulate(topk, {"one": always_one}, [0], [1], 3).iloc[0]
    assert (fetched.hits, fetched.prefetch_loads, fetched.miss_loads) == (1, 3, 3)
    # ... while with a cache of 2 both stay resident: 1 loaded once, 0 missed once
    roomy = simulate(topk, {"one": always_one}, [0], [2], 3).iloc[0]
    assert (roomy.hits, roomy.prefetch_loads, roomy.miss_loads) == (3, 1, 1)
    assert roomy.hit_rate == pytest.approx(0.75) and roomy.loads_per_token == pytest.approx(0.5)


def test_the_oracle_hits_always_and_loads_what_lru_loads():
    rng = np.random.default_rng(1)
    topk = _trace(rng, 40, 2, 8, 2)
    total = compare(topk, {"LRU alone": None, "oracle": topk}, [0, 1], [2, 4, 8], 8).set_index(
        ["strategy", "cache_size"])
    for size in (2, 4, 8):
        assert total.loc[("oracle", size), "hit_rate"] == 1.0
        assert total.loc[("oracle", size), "loads"] == total.loc[("LRU alone", size), "loads"]
    assert total.loc[("LRU alone", 8), "loads"] == len(np.unique(topk[:, 0])) + len(np.unique(topk[:, 1]))


def test_bad_cache_sizes_are_refused():
    topk = np.zeros((3, 1, 2), dtype=int)
    topk[:, :, 1] = 1
    with pytest.raises(ValueError, match="cache sizes must lie in"):
        simulate(topk, {"lru": None}, [0], [1], 4)
    with pytest.raises(ValueError, match="does not match the trace"):
        simulate(topk, {"bad": np.zeros((2, 1, 2), dtype=int)}, [0], [2], 4)
