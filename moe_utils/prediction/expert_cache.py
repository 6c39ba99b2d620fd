"""Offloading simulation: a per-layer LRU expert cache, alone or fed by a prefetcher.

An MoE model whose experts do not fit in accelerator memory keeps ``c`` experts of each MoE layer
resident and loads the others on demand (Eliseev & Mazur, arXiv 2312.17238, offloading Mixtral with
an LRU cache). A prefetcher loads the experts it expects a token to need at layer l while earlier
layers run. This module replays a routing trace through such caches; it is not part of the paper
(Tang et al. 2025) and serves the stage "routing prediction", which asks whether the paper's
cross-layer collaboration makes a better prefetcher than pairwise affinity.

The protocol, per MoE layer, with a cache of ``c >= k`` experts that starts empty; tokens are
served one after another in the trace's order (decode order, one token at a time):

1. **prefetch**: the predictor's experts for this token and layer (``prefetch[t, layer]``, best
   first; -1 entries are skipped) are accessed in that order *before* the token's true experts are
   requested. An expert already resident becomes most recently used; one not resident is loaded
   (one load), evicting the least recently used resident expert if the cache is full.
2. **request**: the token's true top-k experts are requested in routing order. A resident expert
   is a *hit* and becomes most recently used; a missing one is a *miss*: it is loaded (one load),
   evicting the least recently used expert if the cache is full.

Loads count both prefetch loads and miss loads, so a prefetcher that guesses wrong pays for it.
The hit rate is hits / (tokens x k); with the oracle as prefetcher it is 1 and the loads equal
those of LRU alone (the same accesses, in the same order).
"""

from __future__ import annotations

import numpy as np
import pandas as pd


def simulate(topk: np.ndarray, prefetchers: dict[str, np.ndarray | None], layers, cache_sizes,
             n_experts: int) -> pd.DataFrame:
    """Replay the trace ``topk`` (n_tokens, n_layers, k) through one LRU cache per (strategy, layer,
    size), all advancing together, one access at a time, in vectorised numpy.

    Args:
        topk: the true experts of each token at each MoE layer.
        prefetchers: strategy name -> (n_tokens, n_layers, m) experts to prefetch before each
            request (-1: none), or None for LRU alone.
        layers: the MoE layers to simulate.
        cache_sizes: cache capacities in experts, each in [k, n_experts].
        n_experts: experts per layer.

    Returns one row per (strategy, layer, cache_size) with ``hits``, ``requests``,
    ``prefetch_loads``, ``miss_loads``, ``loads`` (their sum), ``hit_rate`` and ``loads_per_token``.
    """
    topk = np.asarray(topk, dtype=np.int64)
    n_tokens, _, k = topk.shape
    layers, sizes = np.asarray(list(layers), dtype=np.int64), np.asarray(list(cache_sizes), dtype=np.int64)
    if sizes.size == 0 or sizes.min() < k or sizes.max() > n_experts:
        raise ValueError(f"cache sizes must lie in [k = {k}, E = {n_experts}], got {sizes.tolist()}")
    names = list(prefetchers)
    width = max([np.asarray(p).shape[2] for p in prefetchers.values() if p is not None], default=0)
    stacked = np.full((n_tokens, len(names), topk.shape[1], width), -1, dtype=np.int64)
    for s, name in enumerate(names):
        if prefetchers[name] is not None:
            prefetch = np.asarray(prefetchers[name])
            if prefetch.shape[:2] != topk.shape[:2]:
                raise ValueError(f"prefetcher {name!r}: shape {prefetch.shape} does not match the trace {topk.shape}")
            stacked[:, s, :, :prefetch.shape[2]] = prefetch
    config_strategy = np.repeat(np.arange(len(names)), len(layers) * len(sizes))  # one cache per config
    config_layer = np.tile(np.repeat(layers, len(sizes)), len(names))
    capacity = np.tile(sizes, len(names) * len(layers))
    n = len(capacity)
    rows = np.arange(n)
    resident = np.zeros((n, n_experts), dtype=bool)
    last_use = np.zeros((n, n_experts), dtype=np.int64)
    occupancy = np.zeros(n, dtype=np.int64)
    hits, prefetch_loads, miss_loads = (np.zeros(n, dtype=np.int64) for _ in range(3))
    clock = 1

    def access(expert: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Access ``expert`` (n,) in every cache (-1: no access); returns (was resident, was loaded)."""
        nonlocal clock
        valid = expert >= 0
        safe = np.where(valid, expert, 0)
        present = resident[rows, safe] & valid
        load = valid & ~present
        evict = load & (occupancy >= capacity)
        if evict.any():
            victim = np.where(resident[evict], last_use[evict], np.iinfo(np.int64).max).argmin(axis=1)
            resident[rows[evict], victim] = False
            occupancy[evict] -= 1
        resident[rows[load], safe[load]] = True
        occupancy[load] += 1
        last_use[rows[valid], safe[valid]] = clock
        clock += 1
        return present, load

    for token in range(n_tokens):
        for slot in range(width):
            prefetch_loads += access(stacked[token, config_strategy, config_layer, slot])[1]
        for slot in range(k):
            present, loaded = access(topk[token, config_layer, slot])
            hits += present
            miss_loads += loaded
    frame = pd.DataFrame({"strategy": np.asarray(names, dtype=object)[config_strategy], "layer": config_layer,
                          "cache_size": capacity, "hits": hits, "requests": n_tokens * k,
                          "prefetch_loads": prefetch_loads, "miss_loads": miss_loads})
    frame["loads"] = frame["prefetch_loads"] + frame["miss_loads"]
    frame["hit_rate"] = frame["hits"] / frame["requests"]
    frame["loads_per_token"] = frame["loads"] / max(n_tokens, 1)
    return frame


def compare(topk: np.ndarray, prefetchers: dict[str, np.ndarray | None], layers, cache_sizes,
            n_experts: int) -> pd.DataFrame:
    """:func:`simulate`, summed over ``layers``: one row per (strategy, cache_size) with the hit rate
    and the expert loads per token and layer."""
    layers = list(layers)
    frame = simulate(topk, prefetchers, layers, cache_sizes, n_experts)
    counts = ["hits", "requests", "prefetch_loads", "miss_loads", "loads"]
    total = frame.groupby(["strategy", "cache_size"], sort=False)[counts].sum().reset_index()
    total["hit_rate"] = total["hits"] / total["requests"]
    total["loads_per_token"] = total["loads"] / (len(topk) * len(layers))
    return total
