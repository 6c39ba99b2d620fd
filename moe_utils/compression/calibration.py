"""Calibration for the pruning baselines: calibration texts, one calibration pass, the output-based search.

The paper's section 4 compares CAEP with pruning methods that score experts on calibration data
(it calibrates on 128 MMLU samples of 2,048 tokens). :func:`calibration_texts` builds the texts
(MMLU via :func:`load_mmlu`, WikiText-2 or the stage-1 prompts; defaults in
:func:`resolve_calibration`); :func:`calibrate` runs the model over them once and collects
:class:`ExpertStats` per routed expert (selection frequency and mean routing weight, the SEER-MoE
family; expert activation norm, EAN; REAP), with each expert's output f_e(x) from
:func:`expert_outputs`; :func:`output_removal_order` is the output-based method (the NAEE / GEM
family), a greedy per-layer search for the experts whose removal changes the layer's output least.
The pass and the search are cached on disk under digests of their inputs.
"""

from __future__ import annotations

import inspect
import io
import json
import os
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
import torch
from torch import nn
from tqdm.auto import tqdm

from moe_utils.common.artifacts import json_digest, sha256_bytes
from moe_utils.common.cache import KeyedCache
from moe_utils.models.loading import MoELayer, is_small_model, moe_layers
from moe_utils.capture.routing import forward_kwargs, model_identity
from moe_utils.evaluation.harness import wikitext_documents
from moe_utils.evaluation.wikitext import load_wikitext
from moe_utils.models.expert_surgery import PruningError, masked_experts
from moe_utils.common.data_env import MMLU_ENV

#: Per-expert statistics of a calibration pass (see :class:`ExpertStats`).
SCORES = ("frequency", "router_weight", "ean", "reap")
_SUMS = ("counts", "weight_sum", "norm_sum", "weighted_norm_sum")


# -------------------------------------------------------------------------- calibration data
def _mmlu_prompt(question: str, choices: Sequence[str], answer: int) -> str:
    letters = "ABCD"
    body = "\n".join(f"{letters[i]}. {str(c).strip()}" for i, c in enumerate(choices))
    return f"{str(question).strip()}\n{body}\nAnswer: {letters[int(answer)]}"


def load_mmlu(split: str = "test", data_dir: str | os.PathLike | None = None) -> list[str]:
    """MMLU questions with their options and answer, one text each (the paper calibrates on MMLU).

    ``data_dir`` (else ``$MOE_MMLU_DIR``) holds ``<split>/<subject>_<split>.csv`` files with the
    header ``question,choice0,choice1,choice2,choice3,answer``; with neither, ``cais/mmlu``
    (config ``all``) comes from the Hugging Face Hub.
    """
    directory = data_dir or os.environ.get(MMLU_ENV)
    if directory:
        files = sorted((Path(directory) / split).glob(f"*_{split}.csv"))
        if not files:
            raise FileNotFoundError(f"no MMLU files {split}/*_{split}.csv in {directory}: point data_dir or "
                                    f"${MMLU_ENV} at a directory of MMLU CSVs, or unset it to use the Hub")
        frame = pd.concat([pd.read_csv(f) for f in files], ignore_index=True)
        choices = frame[[f"choice{i}" for i in range(4)]].astype(str).to_numpy().tolist()
        return [_mmlu_prompt(q, c, a) for q, c, a in zip(frame["question"], choices, frame["answer"])]
    from datasets import load_dataset

    rows = load_dataset("cais/mmlu", "all", split=split)
    return [_mmlu_prompt(r["question"], r["choices"], r["answer"]) for r in rows]


def calibration_texts(tokenizer, source: str = "mmlu", *, n_samples: int | None = 128, n_tokens: int | None = 2048,
                      seed: int = 0, data_dir: str | os.PathLike | None = None,
                      prompts: Sequence[str] | None = None) -> list[str]:
    """``n_samples`` texts of ``n_tokens`` tokens each, packed from shuffled documents of ``source``.

    ``"mmlu"``: MMLU test questions with options and answers (:func:`load_mmlu`); the paper
    calibrates on 128 such samples of 2,048 tokens. ``"wikitext"``: WikiText-2 train articles
    (``data_dir`` else ``$MOE_WIKITEXT_DIR`` else the Hub). Documents are joined with blank lines,
    tokenised, cut into consecutive windows and decoded back to text (tokenising a window again
    may differ by a few tokens; calibrate with ``max_length=n_tokens``).
    ``"capture"``: the given ``prompts`` (the stage-1 texts), all of them or ``n_samples`` chosen
    with ``seed``, unchanged (``n_tokens`` is ignored).
    """
    if source == "capture":
        if prompts is None:
            raise ValueError("calibration source 'capture' needs the stage-1 prompts (prompts=...)")
        if n_samples is None or n_samples >= len(prompts):
            return list(prompts)
        chosen = np.sort(np.random.default_rng(seed).permutation(len(prompts))[:n_samples])
        return [prompts[i] for i in chosen]
    if source == "mmlu":
        documents = load_mmlu("test", data_dir)
    elif source == "wikitext":
        documents = wikitext_documents(load_wikitext("train", data_dir))
    else:
        raise ValueError(f"calibration source must be 'capture', 'mmlu' or 'wikitext', got {source!r}")
    random.Random(seed).shuffle(documents)
    needed = n_samples * n_tokens
    ids: list[int] = []
    for document in documents:
        ids.extend(tokenizer(document + "\n\n", add_special_tokens=False)["input_ids"])
        if len(ids) >= needed:
            break
    if len(ids) < needed:
        raise ValueError(f"{source} holds {len(ids)} tokens, fewer than {n_samples} x {n_tokens}")
    return [tokenizer.decode(ids[i * n_tokens:(i + 1) * n_tokens]) for i in range(n_samples)]


def resolve_calibration(model_name: str, source: str | None = None, n_samples: int | None = None,
                        n_tokens: int | None = None) -> dict:
    """The calibration set, with unset fields filled in.

    Source by default: the paper's MMLU for real checkpoints; for the embedded and random models,
    ``"capture"``, the stage-1 prompts, i.e. the very texts CAEP's dictionary was fitted on, so
    that every method sees the same data. Sizes by default: the paper's 128 samples of 2,048 tokens
    for ``"mmlu"`` and ``"wikitext"``; every prompt, at the capture's length, for ``"capture"``.
    """
    if source is None:
        source = "capture" if is_small_model(model_name) else "mmlu"
    if source not in ("capture", "mmlu", "wikitext"):
        raise ValueError(f"calibration source must be 'capture', 'mmlu' or 'wikitext', got {source!r}")
    if source != "capture":
        n_samples = 128 if n_samples is None else n_samples
        n_tokens = 2048 if n_tokens is None else n_tokens
    return {"source": source, "n_samples": n_samples, "n_tokens": n_tokens}


# -------------------------------------------------------------------------- calibration pass
def _check_fused(layer: MoELayer) -> None:
    if isinstance(layer.experts, nn.ModuleList):
        raise NotImplementedError(
            f"MoE layer {layer.index}: experts are a ModuleList (a remote-code layout); calibration needs the "
            "fused experts module of a transformers 5 MoE, called as experts(hidden, top_k_index, top_k_weights)")


def dense_dispatch(layer: MoELayer) -> bool:
    """True for experts called with the hidden states alone, every expert on its own slice of an
    ``(E * n, H)`` input (Llama 4, which scales each expert's input by its routing score)."""
    return len(inspect.signature(layer.experts.forward).parameters) == 1


def expert_outputs(layer: MoELayer, hidden: torch.Tensor, experts_index: torch.Tensor) -> torch.Tensor:
    """f_e(x): the output of expert ``experts_index[i]`` on ``hidden[i]``, unweighted, (n, H).

    Runs the layer's own fused experts module with a one-hot routing of weight 1
    (``experts(hidden, index[:, None], ones)``), so the architecture's own expert weights,
    activation and biases are used; experts with dense dispatch get ``hidden[i]`` in the slice of
    expert ``experts_index[i]`` and zeros elsewhere. Calls ``forward`` directly: hooks on the module
    do not fire.
    """
    _check_fused(layer)
    if dense_dispatch(layer):
        rows = torch.arange(len(hidden), device=hidden.device)
        routed = hidden.new_zeros(layer.num_experts, len(hidden), hidden.shape[-1])
        routed[experts_index, rows] = hidden
        out = layer.experts.forward(routed.reshape(-1, hidden.shape[-1])).reshape(routed.shape)
        return out[experts_index, rows]
    ones = torch.ones(len(experts_index), 1, dtype=hidden.dtype, device=hidden.device)
    return layer.experts.forward(hidden, experts_index.reshape(-1, 1), ones)


@dataclass
class ExpertStats:
    """Per-expert statistics of one calibration pass; arrays are (n_layers, E), sums over real tokens.

    Attributes:
        n_tokens: real (non-padding) calibration tokens.
        counts: tokens routed to each expert (it was in the token's top-k).
        weight_sum: routing weights the model gave it, summed over those tokens.
        norm_sum: ||f_e(x)||_2 of its output, summed over those tokens.
        weighted_norm_sum: routing weight times ||f_e(x)||_2, summed over those tokens.
        hidden: per MoE layer, the MoE block's input for up to ``keep_hidden`` real tokens (for the
            output-based method); not saved.
    """

    n_tokens: int
    counts: np.ndarray
    weight_sum: np.ndarray
    norm_sum: np.ndarray
    weighted_norm_sum: np.ndarray
    hidden: list[torch.Tensor] = field(default_factory=list, repr=False)

    @property
    def layer_sizes(self) -> list[int]:
        return [self.counts.shape[1]] * self.counts.shape[0]

    def score(self, name: str) -> np.ndarray:
        """One score per expert, (N_e,) in X's row order; larger = more important.

        ``frequency``: share of tokens that select the expert (SEER-MoE's hard count).
        ``router_weight``: its routing weight averaged over all tokens, 0 where not selected
        (SEER-MoE's soft count, with the weights the model used).
        ``ean``: mean ||f_e(x)|| over the tokens routed to it (expert activation norm).
        ``reap``: mean over the tokens routed to it of routing weight x ||f_e(x)|| (REAP).
        Experts never routed score 0 on every measure.
        """
        routed = np.maximum(self.counts, 1)
        values = {"frequency": self.counts / max(self.n_tokens, 1),
                  "router_weight": self.weight_sum / max(self.n_tokens, 1),
                  "ean": self.norm_sum / routed, "reap": self.weighted_norm_sum / routed}
        if name not in values:
            raise ValueError(f"unknown score {name!r}; known: {', '.join(SCORES)}")
        return values[name].ravel()

    def table(self) -> pd.DataFrame:
        """One row per expert: layer, expert and every score."""
        n_layers, n_experts = self.counts.shape
        frame = pd.DataFrame({"layer": np.repeat(np.arange(n_layers), n_experts),
                              "expert": np.tile(np.arange(n_experts), n_layers)})
        for name in SCORES:
            frame[name] = self.score(name)
        return frame


def calibrate(model: nn.Module, tokenizer, texts: Sequence[str], *, batch_size: int = 8, max_length: int = 2048,
              keep_hidden: int = 0, cache_dir: str | os.PathLike | None = None, progress: bool = True) -> ExpertStats:
    """One pass of ``model`` over ``texts``, collecting :class:`ExpertStats` for every routed expert.

    A forward pre-hook on each layer's experts module reads exactly what the MoE block hands its
    experts: the block's input hidden states and the router's chosen indices and weights. For the
    real (non-padding) tokens, every (token, chosen expert) pair's output f_e(x) is computed with
    :func:`expert_outputs`. ``keep_hidden`` > 0 also keeps the first that many real tokens' block
    inputs per layer, for :func:`output_removal_order`. Hooks are always removed. With
    ``cache_dir``, the result is kept there (:class:`moe_utils.common.cache.KeyedCache`) under the
    model (:func:`moe_utils.capture.routing.model_identity`), the texts and the settings, and read back,
    verified, instead of recomputed.
    """
    if not texts:
        raise ValueError("no calibration texts")
    layers = moe_layers(model)
    key = {"model": model_identity(model, layers), "texts": json_digest(list(texts)), "batch_size": batch_size,
           "max_length": max_length, "keep_hidden": keep_hidden}

    def encode(stats: ExpertStats):
        buffer = io.BytesIO()
        np.savez(buffer, n_tokens=stats.n_tokens, **{name: getattr(stats, name) for name in _SUMS},
                 **{f"hidden_{i}": h.float().numpy() for i, h in enumerate(stats.hidden)})
        return {"stats.npz": buffer.getvalue()}, {}

    def decode(folder: Path, _manifest: dict) -> ExpertStats:
        with np.load(folder / "stats.npz") as cached:
            return ExpertStats(int(cached["n_tokens"]), *(cached[name] for name in _SUMS),
                               hidden=[torch.from_numpy(cached[f"hidden_{i}"]) for i in range(len(cached["counts"]))])

    stats, _ = KeyedCache(cache_dir, "calibration").get_or_compute(key, lambda: _calibration_pass(
        model, layers, tokenizer, texts, batch_size=batch_size, max_length=max_length, keep_hidden=keep_hidden,
        progress=progress), encode, decode)
    return stats


def _calibration_pass(model: nn.Module, layers: list[MoELayer], tokenizer, texts: Sequence[str], *, batch_size: int,
                      max_length: int, keep_hidden: int, progress: bool) -> ExpertStats:
    n_experts = max(layer.num_experts for layer in layers)
    sums = {name: torch.zeros(len(layers), n_experts, dtype=torch.float64) for name in _SUMS}
    hidden: list[list[torch.Tensor]] = [[] for _ in layers]
    kept = [0] * len(layers)
    real: dict[str, torch.Tensor] = {}

    def hook_for(layer: MoELayer):
        def hook(_module, args, kwargs):
            states, index, weights = (list(args) + list(kwargs.values()))[:3]
            mask = real["mask"].to(states.device)
            states, index, weights = states[mask], index[mask], weights[mask]
            k = index.shape[1]
            outputs = expert_outputs(layer, states.repeat_interleave(k, dim=0), index.reshape(-1))
            norms = outputs.float().norm(dim=-1).double().cpu()
            flat = index.reshape(-1).cpu()
            w = weights.reshape(-1).double().cpu()
            for name, values in (("counts", torch.ones_like(w)), ("weight_sum", w), ("norm_sum", norms),
                                 ("weighted_norm_sum", w * norms)):
                sums[name][layer.index].index_add_(0, flat, values)
            if kept[layer.index] < keep_hidden:
                take = states[: keep_hidden - kept[layer.index]].detach().cpu()
                hidden[layer.index].append(take)
                kept[layer.index] += len(take)
        return hook

    for layer in layers:
        _check_fused(layer)
    device = next(model.parameters()).device
    kwargs = forward_kwargs(model)
    n_tokens = 0
    handles = [layer.experts.register_forward_pre_hook(hook_for(layer), with_kwargs=True) for layer in layers]
    try:
        with torch.no_grad():
            for start in tqdm(range(0, len(texts), batch_size), desc="calibrating", disable=not progress):
                enc = tokenizer(list(texts[start:start + batch_size]), return_tensors="pt", padding=True,
                                truncation=True, max_length=max_length)
                real["mask"] = enc["attention_mask"].reshape(-1).bool()
                n_tokens += int(real["mask"].sum())
                model(input_ids=enc["input_ids"].to(device), attention_mask=enc["attention_mask"].to(device),
                      use_cache=False, **kwargs)
    finally:
        for handle in handles:
            handle.remove()
    arrays = {name: value.numpy() for name, value in sums.items()}
    return ExpertStats(n_tokens=n_tokens, **arrays,
                       hidden=[torch.cat(parts) if parts else torch.zeros(0) for parts in hidden])


# ------------------------------------------------------------------------ output-based method
def block_output(block: nn.Module, states: torch.Tensor) -> torch.Tensor:
    """An MoE block's output (float32) on the block inputs ``states`` (n, H), run as one sequence."""
    out = block(states[None])
    return (out[0] if isinstance(out, tuple) else out)[0].float()


def output_removal_order(model: nn.Module, hidden: Sequence[torch.Tensor], n_remove: Sequence[int], *,
                         cache_dir: str | os.PathLike | None = None, progress: bool = True) -> list[list[int]]:
    """Per MoE layer, the order in which a greedy search removes ``n_remove[layer]`` experts.

    The NAEE / GEM family of output-based pruning: at each step, remove the remaining expert whose
    removal changes the layer's output least on the calibration tokens ``hidden[layer]`` (the MoE
    block's inputs, see :func:`calibrate`), measured as ||y' - y||^2 / ||y||^2 against the
    unpruned output y. The pruned block re-routes every token among the remaining experts with
    :func:`moe_utils.models.expert_surgery.masked_experts` (the architecture's own routing rule); ties go
    to the lowest index. The orders are nested, so one search serves every ratio. With
    ``cache_dir``, the orders are kept there (:class:`moe_utils.common.cache.KeyedCache`) under the
    model, the tokens and the counts.
    """
    layers = moe_layers(model)
    if len(hidden) != len(layers) or len(n_remove) != len(layers):
        raise ValueError(f"need calibration tokens and a count for each of the {len(layers)} MoE layers")
    key = {"model": model_identity(model, layers), "n_remove": [int(n) for n in n_remove],
           "hidden": [sha256_bytes(h.float().numpy().tobytes()) for h in hidden]}
    orders, _ = KeyedCache(cache_dir, "output").get_or_compute(
        key, lambda: _greedy_search(model, layers, hidden, n_remove, progress=progress),
        lambda orders: ({"orders.json": json.dumps(orders).encode()}, {"n_remove": key["n_remove"]}),
        lambda folder, _manifest: json.loads((folder / "orders.json").read_text()))
    return orders


def _greedy_search(model: nn.Module, layers: list[MoELayer], hidden: Sequence[torch.Tensor], n_remove: Sequence[int],
                   *, progress: bool) -> list[list[int]]:
    orders: list[list[int]] = []
    steps = tqdm(total=int(sum(n_remove)), desc="output-based search", disable=not progress)
    with torch.no_grad():
        for layer, states, count in zip(layers, hidden, n_remove):
            if len(states) == 0:
                raise ValueError(f"no calibration tokens for MoE layer {layer.index}: calibrate with keep_hidden > 0")
            weight = next(layer.block.parameters())  # the block's own device (device_map="auto" spreads layers)
            states = states.to(device=weight.device, dtype=weight.dtype)
            reference = block_output(layer.block, states)
            scale = float(reference.pow(2).sum()) or 1.0
            keep = [np.arange(other.num_experts) for other in layers]
            order: list[int] = []
            for _ in range(count):
                best: tuple[float, int] | None = None
                for candidate in keep[layer.index]:
                    trial = list(keep)
                    trial[layer.index] = keep[layer.index][keep[layer.index] != candidate]
                    try:
                        with masked_experts(model, trial, layers):
                            change = float((block_output(layer.block, states) - reference).pow(2).sum()) / scale
                    except PruningError as err:
                        raise PruningError(f"the output-based method removes one expert at a time, which this "
                                           f"router does not allow: {err}") from err
                    if best is None or change < best[0]:
                        best = (change, int(candidate))
                order.append(best[1])
                keep[layer.index] = keep[layer.index][keep[layer.index] != best[1]]
                steps.update()
            orders.append(order)
    steps.close()
    return orders

