"""Stage 6's findings as verdicts: does HSDL predict the next layer's experts better than its controls,
and what does prefetching with it cost?

The paper (Tang et al. 2025) does not test its cross-layer patterns as predictors. Stage 6 compares
HSDL with first-order affinity (layer l alone), with naive Bayes over every layer <= l (the same
information HSDL reads, through pairwise statistics only) and with the token's identity (no routing
at all); :func:`findings` turns the measured recalls, paired differences and cache loads into
sentences for the book's introduction, each opening with what was found.
"""

from __future__ import annotations

from collections.abc import Mapping

from moe_utils.common.stats import Interval


def _pct(interval: Interval) -> str:
    return f"{interval.estimate * 100:.1f}% [{interval.low * 100:.1f}, {interval.high * 100:.1f}]"


def _points(interval: Interval) -> str:
    return f"{interval.estimate * 100:+.1f} points [{interval.low * 100:+.1f}, {interval.high * 100:+.1f}]"


def findings(model: str, n_tokens: int, recall: Mapping[str, Interval], versus: Mapping[str, Interval],
             loads: Mapping[str, float], hits: Mapping[str, float], cache_size: int, n_experts: int) -> dict[str, str]:
    """``finding_prediction`` and ``finding_prefetch``.

    Args:
        recall: recall@k one layer ahead per predictor key (``token``, ``affinity``, ``bayes``,
            ``hsdl``, ``hidden``), with intervals.
        versus: HSDL minus ``affinity``, ``bayes`` and ``token`` (paired differences of recall@k).
        loads, hits: expert loads per token and layer and hit rates (shares) at ``cache_size``, per
            strategy key (``lru`` for LRU alone, then the predictor keys).
    """
    def relation(key):
        d = versus[key]
        return "better than" if d.low > 0 else "worse than" if d.high < 0 else "neither better nor worse than"

    opening = (f"HSDL's patterns predict the next layer's experts {relation('bayes')} naive Bayes over the same "
               f"layers and {relation('token')} the token's identity alone.")
    prediction = (f"{opening} Recall@k one layer ahead on {n_tokens} held-out tokens of {model}: token id "
                  f"{_pct(recall['token'])}, naive Bayes over layers <= l {_pct(recall['bayes'])}, HSDL "
                  f"{_pct(recall['hsdl'])}, first-order affinity {_pct(recall['affinity'])}, the next router on the "
                  f"hidden state {_pct(recall['hidden'])}; HSDL minus affinity {_points(versus['affinity'])}, minus "
                  f"naive Bayes {_points(versus['bayes'])}, minus the token id {_points(versus['token'])}.")
    more = loads["hsdl"] > loads["lru"]
    opening = ("Prefetching by HSDL buys cache hits with extra expert loads." if more else
               "Prefetching by HSDL raises cache hits without extra expert loads.")
    prefetch = (f"{opening} With {cache_size} of {n_experts} experts cached per layer, LRU alone hits "
                f"{hits['lru'] * 100:.1f}% at {loads['lru']:.2f} loads per token and layer; with HSDL prefetching "
                f"{hits['hsdl'] * 100:.1f}% at {loads['hsdl']:.2f}, with the token id {hits['token'] * 100:.1f}% at "
                f"{loads['token']:.2f}, with the next router {hits['hidden'] * 100:.1f}% at {loads['hidden']:.2f}.")
    return {"finding_prediction": prediction, "finding_prefetch": prefetch}
