"""Stage 6's findings as verdicts: does HSDL predict the next layer's experts better than its controls,
and what does prefetching with it cost?

The paper (Tang et al. 2025) does not test its cross-layer patterns as predictors. Stage 6 compares
HSDL with first-order affinity (layer l alone), with naive Bayes over every layer <= l (the same
information HSDL reads, through pairwise statistics only) and with the token's identity (no routing
at all); :func:`findings` turns the measured recalls, paired differences and cache loads into
sentences for the book's introduction, each opening with what was found.

The rest is the stage's pipeline, each step returning what the page shows with the values it glues:
:func:`open_fitted` (stage 1's store and stage 2's dictionary), :func:`open_heldout` (the held-out
capture; both check their inputs with :func:`require_token_dictionary` and :func:`require_same_model`),
:func:`describe`, :func:`score` (every predictor's rankings and hits), :func:`recall_table`,
:func:`recall_layers`, :func:`versus_controls`, :func:`ahead_table`, :func:`cache_summary`,
:func:`stage_findings` and :func:`save_results`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from itertools import product

import numpy as np
import pandas as pd

from moe_utils.capture.routing import router_fingerprint
from moe_utils.capture.store import RoutingStore
from moe_utils.common.artifacts import write_artifact
from moe_utils.common.markup import code_span
from moe_utils.common.stats import Interval
from moe_utils.evaluation.data import load_prompts
from moe_utils.patterns.expert_matrix import expert_matrix
from moe_utils.patterns.hsdl import HSDL
from moe_utils.prediction import expert_cache
from moe_utils.prediction import routing_prediction as rp
from moe_utils.prediction.hidden_prediction import capture_with_hidden_predictions


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


@dataclass(frozen=True)
class HeldOut:
    """What stage 6 scores: stage 1's store (the fitting tokens), stage 2's dictionary, and the
    held-out tokens captured with the next routers' rankings on the hidden state (``hidden[h]``)."""

    fit_store: RoutingStore
    hsdl: HSDL
    store: RoutingStore
    hidden: dict[int, np.ndarray]
    questions: pd.DataFrame


def require_token_dictionary(hsdl) -> dict:
    """The dictionary's ``x_spec``; ValueError, saying how to re-fit, unless it was fitted on token columns
    (a token's code is inferred from its own routing)."""
    x_spec = hsdl.manifest_["x_spec"]
    if x_spec["granularity"] != "token":
        raise ValueError("stage 6 reads a dictionary fitted on token columns: run stage 2 with granularity='token'")
    return x_spec


def require_same_model(lm, fit_store: RoutingStore, model: str) -> None:
    """ValueError unless ``lm``'s routers are those that produced stage 1's store (by fingerprint)."""
    if router_fingerprint(lm) != fit_store.manifest["fingerprint"]["model"]:
        raise ValueError(f"model {model!r} is not the model of stage 1's store: run both stages with the same model")


def heldout_prompts(spec: Mapping, per_category: int, seed: int, data_dir=None):
    """``(texts, labels, questions)``: ``per_category`` MMLU-Pro questions of each of stage 1's
    categories (``spec``: its store's ``data``), sampled with ``seed`` after excluding stage 1's questions."""
    captured = load_prompts(spec["categories"], spec["n_per_category"], spec["seed"], data_dir)[2]["question_id"]
    return load_prompts(spec["categories"], per_category, seed, data_dir, exclude_ids=captured)


def open_fitted(paths) -> tuple[RoutingStore, HSDL]:
    """Stage 1's store and stage 2's dictionary, the dictionary checked (:func:`require_token_dictionary`)
    before the model loads."""
    hsdl = HSDL.load(paths.hsdl)
    require_token_dictionary(hsdl)
    return RoutingStore.open(paths.store), hsdl


def open_heldout(paths, fit_store: RoutingStore, hsdl: HSDL, lm, tokenizer, model: str, *, horizons,
                 per_category: int, seed: int, data_dir=None, batch_size: int = 8, max_length: int = 512) -> HeldOut:
    """The held-out questions (:func:`heldout_prompts`) captured by ``lm`` (checked to be stage 1's
    model, :func:`require_same_model`) into ``paths.prediction / "heldout_store"`` while the routers of
    the layers ``horizons`` ahead rank experts on the hidden state."""
    x_spec = require_token_dictionary(hsdl)
    require_same_model(lm, fit_store, model)
    spec = fit_store.manifest["data"]
    texts, labels, questions = heldout_prompts(spec, per_category, seed, data_dir)
    store, hidden = capture_with_hidden_predictions(
        lm, tokenizer, texts, out_dir=paths.prediction / "heldout_store", horizons=horizons, labels=labels,
        batch_size=batch_size, max_length=max_length, record_probs=x_spec["value"] == "prob",
        data_spec={"dataset": "TIGER-Lab/MMLU-Pro", "split": "test", "categories": spec["categories"],
                   "n_per_category": per_category, "seed": seed, "excluded": "stage 1's questions"})
    return HeldOut(fit_store, hsdl, store, hidden, questions)


def describe(held: HeldOut, model: str, *, per_category: int, seed: int, confidence: float) -> tuple[str, dict]:
    """The page's line on the model and the fitting and held-out tokens (Markdown, the name escaped) and
    the values it glues."""
    store = held.store
    text = (f"**Model:** {code_span(model)}, {store.n_layers} MoE layers of {store.n_experts} experts, "
            f"top-{store.top_k}. **Fitting tokens:** {held.fit_store.n_tokens} (stage 1). **Held-out tokens:** "
            f"{store.n_tokens} from {len(held.questions)} other MMLU-Pro questions ({per_category} per category, "
            f"seed {seed}), none of stage 1's.")
    return text, {"n_test_tokens": store.n_tokens, "model_name": model, "n_experts": store.n_experts,
                  "confidence_pct": confidence * 100}


@dataclass(frozen=True)
class Scores:
    """Every predictor's rankings and hits on the held-out tokens: ``ranked[h][name]`` (rankings of
    :data:`~moe_utils.prediction.routing_prediction.PREDICTORS`), ``hits[h][name][m]`` (true experts
    among the top m, m in ``m_values``: k and 2k), ``targets[h]`` (the layers a layer h before them
    predicts), the true top-k ``truth`` and each token's question ``samples``."""

    ranked: dict
    hits: dict
    targets: dict[int, np.ndarray]
    m_values: list[int]
    truth: np.ndarray
    samples: np.ndarray
    k: int
    n_experts: int


def score(held: HeldOut, horizons, *, n_steps: int = 100) -> Scores:
    """Rank every predictor for every horizon (:func:`moe_utils.prediction.routing_prediction.all_rankings`)
    and count its hits at m = k and 2k."""
    store, fit_store = held.store, held.fit_store
    k, n_experts = store.top_k, store.n_experts
    truth = np.asarray(store.topk_indices)
    m_values = sorted({k, min(2 * k, n_experts)})
    ranked = rp.all_rankings(np.asarray(fit_store.topk_indices), truth, n_experts, horizons, m_values[-1],
                             hsdl=held.hsdl, hidden=held.hidden, n_steps=n_steps,
                             x=expert_matrix(store, "token", held.hsdl.manifest_["x_spec"]["value"]),
                             fit_token_ids=fit_store.tokens["token_id"], token_ids=store.tokens["token_id"])
    hits = {h: {name: {m: rp.hit_counts(r, truth, m) for m in m_values} for name, r in ranked[h].items()}
            for h in horizons}
    return Scores(ranked, hits, {h: np.arange(h, store.n_layers) for h in horizons}, m_values, truth,
                  store.tokens["sample_id"].to_numpy(), k, n_experts)


def _suffixes(scores: Scores):
    """``(m, suffix)`` of the glued names: "" at m = k, "_2k" at m = 2k (when the layer has 2k experts)."""
    return zip(scores.m_values, ("", "_2k"))


def recall_table(scores: Scores, *, confidence: float, n_boot: int) -> tuple[pd.DataFrame, dict]:
    """Recall@m and precision@m one layer ahead per predictor and m
    (:func:`moe_utils.prediction.routing_prediction.recall_summary`) and the glued recalls (%):
    ``<key>_recall[_low|_high][_2k]`` for every predictor key of ``KEYS``."""
    summary = rp.recall_summary(scores.hits[1], scores.samples, scores.targets[1], scores.k, confidence=confidence,
                                n_boot=n_boot)
    by_m = summary.set_index(["m", "predictor"])
    values = {f"{key}_{column}{suffix}": float(by_m.loc[(m, name), column] * 100)
              for (m, suffix), (key, name), column in product(_suffixes(scores), rp.KEYS.items(),
                                                              ("recall", "recall_low", "recall_high"))}
    return summary, values


def recall_layers(scores: Scores, *, confidence: float, n_boot: int) -> pd.DataFrame:
    """Recall@k one layer ahead per predictor and predicted layer."""
    return rp.recall_by_layer({n: v[scores.k] for n, v in scores.hits[1].items()}, scores.samples, scores.targets[1],
                              scores.k, confidence=confidence, n_boot=n_boot)


#: HSDL's controls: (prefix of the glued names, predictor key).
CONTROLS = (("", "affinity"), ("bayes_", "bayes"), ("token_", "token"))


def versus_controls(scores: Scores, *, confidence: float, n_boot: int) -> tuple[dict[str, Interval], dict]:
    """HSDL minus first-order affinity, naive Bayes and the token id, recall one layer ahead at every m
    (paired over the same tokens, questions resampled): ``{"hsdl_minus_<control>_m<m>": interval}``
    and the glued differences (points) and verdicts."""
    differences, values = {}, {}
    for (m, suffix), (prefix, other) in product(_suffixes(scores), CONTROLS):
        d = rp.paired_difference(scores.hits[1][rp.KEYS["hsdl"]][m], scores.hits[1][rp.KEYS[other]][m],
                                 scores.samples, scores.targets[1], scores.k, confidence=confidence, n_boot=n_boot)
        differences[f"hsdl_minus_{other}_m{m}"] = d
        values.update({f"{prefix}diff{suffix}": d.estimate * 100, f"{prefix}diff_low{suffix}": d.low * 100,
                       f"{prefix}diff_high{suffix}": d.high * 100,
                       f"{prefix or 'hsdl_'}verdict{suffix}": rp.verdict(d)})
    return differences, values


def ahead_table(scores: Scores, *, confidence: float, n_boot: int) -> pd.DataFrame:
    """Recall@k per predictor and horizon h, over the layers that have a layer h before them."""
    frames = [rp.recall_summary(scores.hits[h], scores.samples, scores.targets[h], scores.k, confidence=confidence,
                                n_boot=n_boot).assign(horizon=h) for h in scores.hits if len(scores.targets[h])]
    ahead = pd.concat(frames)
    return ahead[ahead["m"] == scores.k]


#: The cache strategies: LRU alone, then LRU with each predictor prefetching, by glued key.
STRATEGIES = {"lru": "LRU alone", **{key: f"LRU + {name}" for key, name in rp.KEYS.items()}}


def cache_summary(scores: Scores) -> tuple[pd.DataFrame, pd.DataFrame, dict]:
    """A per-layer LRU cache of every size from k to E, alone and with each predictor prefetching its
    top-k one layer ahead (:func:`moe_utils.prediction.expert_cache.compare`): ``(cache, table, values)``,
    the table at E/4 and E/2 experts (at least k) and the glued hit rates (%) and loads per token and
    layer at the larger size (``hit_<key>``, ``loads_<key>``), with LRU's and HSDL's loads at the smaller."""
    k, n_experts = scores.k, scores.n_experts
    prefetchers = {STRATEGIES["lru"]: None, **{f"LRU + {n}": r[:, :, :k] for n, r in scores.ranked[1].items()}}
    cache = expert_cache.compare(scores.truth, prefetchers, scores.targets[1], range(k, n_experts + 1), n_experts)
    sizes = sorted({max(k, n_experts // 4), max(k, n_experts // 2)})
    table = cache[cache["cache_size"].isin(sizes)].pivot(index="strategy", columns="cache_size",
                                                         values=["hit_rate", "loads_per_token"])
    values = {"cache_size": sizes[-1], "cache_size_small": sizes[0],
              "loads_small_lru": float(table.loc[STRATEGIES["lru"], ("loads_per_token", sizes[0])]),
              "loads_small_hsdl": float(table.loc[STRATEGIES["hsdl"], ("loads_per_token", sizes[0])])}
    for key, strategy in STRATEGIES.items():
        values[f"hit_{key}"] = float(table.loc[strategy, ("hit_rate", sizes[-1])] * 100)
        values[f"loads_{key}"] = float(table.loc[strategy, ("loads_per_token", sizes[-1])])
    return cache, table, values


def stage_findings(model: str, scores: Scores, summary: pd.DataFrame, differences: Mapping[str, Interval],
                   cache_values: Mapping, *, confidence: float) -> dict[str, str]:
    """:func:`findings` of this run: recall@k one layer ahead with its intervals (of :func:`recall_table`'s
    summary), HSDL minus each control at m = k (:func:`versus_controls`) and the cache at the larger size
    (:func:`cache_summary`'s values)."""
    by_m = summary.set_index(["m", "predictor"])
    recall = {key: Interval(*by_m.loc[(scores.k, name), ["recall", "recall_low", "recall_high"]], confidence)
              for key, name in rp.KEYS.items()}
    versus = {other: differences[f"hsdl_minus_{other}_m{scores.k}"] for _, other in CONTROLS}
    return findings(model, len(scores.truth), recall, versus,
                    loads={key: cache_values[f"loads_{key}"] for key in STRATEGIES},
                    hits={key: cache_values[f"hit_{key}"] / 100 for key in STRATEGIES},
                    cache_size=cache_values["cache_size"], n_experts=scores.n_experts)


def save_results(out_dir, model: str, held: HeldOut, summary: pd.DataFrame, ahead: pd.DataFrame,
                 differences: Mapping[str, Interval], cache: pd.DataFrame) -> dict:
    """Write the stage's artifact (``results.json`` with a checksummed manifest,
    :func:`moe_utils.common.artifacts.write_artifact`); returns its manifest."""
    results = {"recall": summary.to_dict(orient="records"), "ahead": ahead.to_dict(orient="records"),
               "differences": {name: vars(d) for name, d in differences.items()},
               "cache": cache.to_dict(orient="records"), "n_test_tokens": held.store.n_tokens,
               "heldout_question_ids": held.questions["question_id"].tolist()}
    content = json.dumps(results, indent=1, sort_keys=True, default=str).encode()
    return write_artifact(out_dir, {"results.json": content}, {"format": "moe-routing-prediction/1", "model": model})
