"""Conformance of every MoE causal LM that transformers ships: is its routing read and pruned exactly?

The study claims that any transformers MoE is "one parameter away". This module checks the claim,
model type by model type, on a tiny random model built from the type's own config class
(:func:`moe_utils.models.tiny_configs.tiny_config`), each check against an independent truth:

* ``capture``: the routing store (paper section 1) holds, for every real token of a padded batch,
  exactly the experts that the block handed to its experts module when the text ran alone;
* ``masked_never_chosen``: under :func:`moe_utils.models.expert_surgery.masked_experts`, no pruned expert
  ever reaches the experts module;
* ``removal_equals_masking``: :func:`~moe_utils.models.expert_surgery.remove_experts` gives the masked
  logits (max |diff| <= 1e-5), with equal and with per-layer counts;
* ``save_reload``: the removed model, saved with ``save_pruned`` and reloaded with
  ``load_pruned``, gives the same logits;
* ``calibration``: the per-expert outputs of :func:`moe_utils.compression.calibration.expert_outputs`,
  recombined with the routing weights, equal the experts module's own output inside the block.

One more column, over the types where every check above passes: ``merging`` (expert merging,
:mod:`moe_utils.compression.merging`): a merge of the even keep-list's removed experts into the
kept ones, with random weights and the members' neurons aligned as M-SMoE aligns them, gives the
same logits applied in place (:func:`~moe_utils.compression.merging.applied`) as physically
compressed (:func:`~moe_utils.compression.merging.compress`) and after ``save_pruned`` /
``load_pruned``, with fewer expert weights; a group of one expert leaves that expert unchanged.

The model types come from transformers itself (:func:`moe_model_types`): every causal-LM type of its
auto mapping whose modeling code defines an experts class. ``python -m moe_utils.models.conformance
--out bench/results/conformance.json`` writes the table the book's Reproducing page shows.
"""

from __future__ import annotations

import argparse
import copy
import importlib
import inspect
import json
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from moe_utils.common.project import BENCH_RESULTS
from moe_utils.capture.routing import capture_routing
from moe_utils.common.artifacts import atomic_write_json, package_versions
from moe_utils.compression.calibration import dense_dispatch, expert_outputs
from moe_utils.compression.merging import applied, compress
from moe_utils.compression.value import Compression
from moe_utils.models.discovery import DiscoveryError
from moe_utils.models.expert_surgery import (
    allowed_counts, load_pruned, masked_experts, remove_experts, save_pruned,
)
from moe_utils.models.loading import moe_layers
from moe_utils.models.tiny_configs import byte_tokenizer, tiny_config

#: Largest |logit difference| accepted between masked, removed and reloaded models.
TOLERANCE = 1e-5
CHECKS = ("capture", "masked_never_chosen", "removal_equals_masking", "save_reload", "calibration")
#: The merging column, reported apart from :data:`CHECKS` (see the module docstring).
MERGING_CHECKS = ("merging",)
#: Texts of different lengths, so that a batch of them is padded.
TEXTS = ("The integral of x squared is x cubed over three.", "Courts interpret statutes.",
         "def f(x): return x + 1", "Q")


def moe_model_types() -> list[str]:
    """The MoE causal-LM model types of the installed transformers: the keys of its causal-LM auto
    mapping whose modeling module defines a class named ``*Experts``."""
    import transformers
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    found = []
    for model_type, class_name in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.items():
        try:
            module = importlib.import_module(getattr(transformers, class_name).__module__)
        except (AttributeError, ImportError):
            continue
        if any(inspect.isclass(obj) and obj.__module__ == module.__name__ and name.endswith("Experts")
               for name, obj in vars(module).items()):
            found.append(model_type)
    return sorted(found)


def _randomize_routers(model: nn.Module) -> None:
    """Give every router distinct random rows and a non-zero per-expert bias, so that choices differ
    between tokens and a bias that is not applied would show (some configs initialise routers at 0)."""
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for layer in moe_layers(model):
            n = layer.num_experts
            for tensor in [*layer.router.parameters(), *layer.router.buffers(), *layer.block.buffers(recurse=False)]:
                if not tensor.is_floating_point():
                    continue
                if tensor.dim() == 2 and tensor.shape[0] == n:
                    tensor.copy_(torch.randn(tensor.shape, generator=generator) / tensor.shape[1] ** 0.5)
                elif tensor.numel() == n:
                    tensor.copy_(torch.linspace(-0.05, 0.05, n).reshape(tensor.shape))


class ExpertCalls:
    """Records what each MoE block hands its experts module: ``(hidden, indices, weights, output)``."""

    def __init__(self, layers):
        self.layers = layers
        self.calls: dict[int, list[tuple]] = {layer.index: [] for layer in layers}

    def __enter__(self):
        def hook_for(index):
            def hook(_module, args, kwargs, output):
                inputs = [*args, *kwargs.values()]
                self.calls[index].append((*inputs[:3], output))
            return hook
        self.handles = [layer.experts.register_forward_hook(hook_for(layer.index), with_kwargs=True)
                        for layer in self.layers]
        return self

    def __exit__(self, *exc):
        for handle in self.handles:
            handle.remove()

    def indices(self) -> list[np.ndarray]:
        """Per MoE layer, the (tokens, k) expert indices of the last call, rows sorted. Experts called
        with the hidden states alone (dense dispatch: Llama 4 runs every expert on its input scaled by
        its score) ran for a token exactly where that token's input rows are not zero."""
        chosen = []
        for layer in self.layers:
            call = self.calls[layer.index][-1]
            if isinstance(call[1], torch.Tensor) and not call[1].is_floating_point():
                chosen.append(np.sort(call[1].reshape(-1, layer.top_k).cpu().numpy(), axis=1))
                continue
            routed = call[0].reshape(layer.num_experts, -1, call[0].shape[-1])  # (E, tokens, H)
            active = (routed != 0).any(dim=-1).T.cpu().numpy()  # (tokens, E)
            if not (active.sum(axis=1) == layer.top_k).all():
                raise AssertionError(f"MoE layer {layer.index}: a token's input is non-zero for a number of "
                                     "experts other than top-k")
            chosen.append(np.sort(np.nonzero(active)[1].reshape(-1, layer.top_k), axis=1))
        return chosen


def _logits(model, tokenizer) -> torch.Tensor:
    enc = tokenizer(list(TEXTS), return_tensors="pt", padding=True)
    with torch.no_grad():
        out = model(**enc, use_cache=False).logits
    return out.masked_fill(~enc["attention_mask"].bool()[..., None], 0.0)


def _keep_masks(model) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """An even keep-list (two experts fewer per layer, or the nearest count the router allows) and
    an uneven one (a different count per layer), chosen at random but reproducibly."""
    rng = np.random.default_rng(0)
    even, uneven = [], []
    layers = moe_layers(model)
    for layer, allowed in zip(layers, allowed_counts(model, layers)):
        options = allowed or list(range(layer.top_k, layer.num_experts + 1))
        options = [c for c in options if c < layer.num_experts] or [layer.num_experts]
        wanted = [max(layer.num_experts - 2, layer.top_k), max(layer.num_experts - 1 - layer.index % 3, layer.top_k)]
        for keep, target in zip((even, uneven), wanted):
            count = min(options, key=lambda c: (abs(c - target), c))
            keep.append(np.sort(rng.choice(layer.num_experts, count, replace=False)))
    return even, uneven


def _check_capture(model, tokenizer, layers, workdir: Path) -> str:
    """The store, captured from one padded batch, against the experts' own inputs in that same
    forward pass, at the real (unpadded) positions."""
    store = capture_routing(model, tokenizer, list(TEXTS), out_dir=workdir / "store", batch_size=len(TEXTS),
                            progress=False)
    enc = tokenizer(list(TEXTS), return_tensors="pt", padding=True)
    real = enc["attention_mask"].reshape(-1).bool().numpy()
    with ExpertCalls(layers) as calls, torch.no_grad():
        model(**enc, use_cache=False)
    if len(store.tokens) != int(real.sum()):
        return f"fail: the store has {len(store.tokens)} tokens for {int(real.sum())} real ones"
    if not np.array_equal(store.tokens.token_id.to_numpy(), enc["input_ids"].reshape(-1).numpy()[real]):
        return "fail: the store's token ids are not the real tokens in batch order"
    for layer, truth in zip(layers, calls.indices()):
        if not np.array_equal(np.sort(store.topk_indices[:, layer.index, :], axis=1), truth[real]):
            return f"fail: MoE layer {layer.index} differs from what the block gave its experts"
    return "pass"


def _check_masked(model, tokenizer, layers, keep) -> str:
    enc = tokenizer(list(TEXTS), return_tensors="pt", padding=True)
    with masked_experts(model, keep), ExpertCalls(layers) as calls, torch.no_grad():
        model(**enc, use_cache=False)
    for layer, chosen, kept in zip(layers, calls.indices(), keep):
        if not np.isin(chosen, kept).all():
            return f"fail: MoE layer {layer.index} chose pruned experts {sorted(set(chosen.ravel()) - set(kept))}"
    return "pass"


def _check_removal(model, tokenizer, keeps, workdir: Path, *, reload: bool) -> tuple[str, str]:
    removal, reloaded = "pass", "pass" if reload else "not run"
    for name, keep in zip(("even", "uneven"), keeps):
        with masked_experts(model, keep):
            masked = _logits(model, tokenizer)
        removed = remove_experts(copy.deepcopy(model), keep)
        diff = float((_logits(removed, tokenizer) - masked).abs().max())
        if not diff <= TOLERANCE:
            removal = f"fail: {name} counts, max |logit diff| {diff:.2e}"
        if reload:
            save_pruned(removed, workdir / name, overwrite=True)
            diff = float((_logits(load_pruned(workdir / name), tokenizer) - masked).abs().max())
            if not diff <= TOLERANCE:
                reloaded = f"fail: {name} counts after reload, max |logit diff| {diff:.2e}"
    return removal, reloaded


def _check_calibration(model, tokenizer, layers) -> str:
    """Per-expert outputs recombined against the experts module's own output in the block: weighted
    by the routing weights, or, for dense dispatch (Llama 4), each run on its score-scaled input."""
    enc = tokenizer(list(TEXTS), return_tensors="pt", padding=True)
    with ExpertCalls(layers) as calls, torch.no_grad():
        model(**enc, use_cache=False)
        chosen = calls.indices()
        for layer, index in zip(layers, chosen):
            call = calls.calls[layer.index][-1]
            if dense_dispatch(layer):
                routed, output = call[0], call[-1]
                routed = routed.reshape(layer.num_experts, -1, routed.shape[-1])
                rows = torch.arange(routed.shape[1])
                index = torch.as_tensor(index)
                recombined = sum(expert_outputs(layer, routed[index[:, j], rows], index[:, j])
                                 for j in range(index.shape[1]))
                output = output.reshape(routed.shape).sum(dim=0)
            else:
                hidden, index, weights, output = call
                hidden = hidden.reshape(-1, hidden.shape[-1])
                index, weights = index.reshape(len(hidden), -1), weights.reshape(len(hidden), -1)
                recombined = sum(weights[:, j, None].to(hidden.dtype) * expert_outputs(layer, hidden, index[:, j])
                                 for j in range(index.shape[1]))
                output = output.reshape(recombined.shape)
            scale = float(output.abs().max()) or 1.0
            diff = float((recombined - output).abs().max())
            if not diff <= 1e-4 * scale + 1e-6:
                return f"fail: MoE layer {layer.index}, max |diff| {diff:.2e} (output scale {scale:.2e})"
    return "pass"


def _check_merging(model, tokenizer, keep: list[np.ndarray], workdir: Path, *, reload: bool) -> str:
    """A merge of every removed expert into a kept one (expert ``i`` into the ``i % n``-th kept
    expert), with random positive weights and aligned neurons: applied in place, compressed and
    reloaded, the logits agree, and the compressed model holds fewer parameters."""
    layers = moe_layers(model)
    width = max(layer.num_experts for layer in layers)
    flat = np.zeros(len(layers) * width, dtype=bool)
    groups = []
    for layer, kept in zip(layers, keep):
        flat[layer.index * width + kept] = True
        members = {int(k): [int(k)] for k in kept}
        for i, expert in enumerate(sorted(set(range(layer.num_experts)) - set(kept.tolist()))):
            members[int(kept[i % len(kept)])].append(expert)
        groups.append([members[int(k)] for k in kept])
    weights = np.random.default_rng(0).random(len(flat)) + 0.1
    merge = Compression("conformance", 0.0, flat, groups=groups, weights=weights, align=True)
    with applied(model, merge):
        expected = _logits(model, tokenizer)
    merged = compress(copy.deepcopy(model), merge)
    if sum(p.numel() for p in merged.parameters()) >= sum(p.numel() for p in model.parameters()):
        return "fail: the merged model holds no fewer parameters"
    diff = float((_logits(merged, tokenizer) - expected).abs().max())
    if not diff <= TOLERANCE:
        return f"fail: compressed against applied, max |logit diff| {diff:.2e}"
    if reload:
        diff = float((_logits(load_pruned(save_pruned(merged, workdir / "merged", overwrite=True)), tokenizer)
                      - expected).abs().max())
        if not diff <= TOLERANCE:
            return f"fail: after reload, max |logit diff| {diff:.2e}"
    return "pass"


def _guarded(check: Callable[[], Any]) -> Any:
    try:
        return check()
    except Exception as err:  # noqa: BLE001 - every failure is a result of the table, with its reason
        return f"fail: {type(err).__name__}: {str(err).splitlines()[0][:200]}"


def check_model_type(model_type: str, workdir: str | Path | None = None) -> dict:
    """Build a tiny ``model_type`` and run every check of this module on it; returns one row of the
    table: ``status`` (``"supported"``, ``"unsupported"`` with the error that users get, or
    ``"not buildable"`` where its config cannot be made tiny), how its layers were found, E, k, and
    each check's ``"pass"`` or ``"fail: ..."``."""
    row: dict[str, Any] = {"model_type": model_type}
    start = time.perf_counter()
    try:
        config = tiny_config(model_type)
        torch.manual_seed(0)
        from transformers import AutoModelForCausalLM
        model = AutoModelForCausalLM.from_config(config).eval()
        tokenizer = byte_tokenizer()
        with torch.no_grad():
            model(**tokenizer(list(TEXTS), return_tensors="pt", padding=True), use_cache=False)
    except Exception as err:  # noqa: BLE001
        return {**row, "status": "not buildable", "reason": f"{type(err).__name__}: {str(err).splitlines()[0][:200]}"}
    try:
        moe_layers(model)
    except (DiscoveryError, NotImplementedError, ValueError) as err:
        return {**row, "status": "unsupported", "reason": str(err)}
    return {**row, **check_model(model, tokenizer, workdir), "seconds": round(time.perf_counter() - start, 2)}


def check_model(model: nn.Module, tokenizer, workdir: str | Path | None = None, *, reload: bool = True) -> dict:
    """Every check of this module on one model (its routers are re-drawn at random first); ``reload``
    False skips ``save_reload`` for a model class that transformers cannot build from a config."""
    layers = moe_layers(model)
    row: dict[str, Any] = dict(status="supported", found_by=layers[0].architecture.found_by,
                               n_moe_layers=len(layers), n_experts=layers[0].num_experts, top_k=layers[0].top_k,
                               scoring=layers[0].architecture.scoring)
    _randomize_routers(model)
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        tmp = Path(tmp)
        keeps = _guarded(lambda: _keep_masks(model))
        row["capture"] = _guarded(lambda: _check_capture(model, tokenizer, layers, tmp))
        if isinstance(keeps, str):
            row.update({name: keeps for name in CHECKS[1:4]})
        else:
            row["masked_never_chosen"] = _guarded(lambda: _check_masked(model, tokenizer, layers, keeps[0]))
            results = _guarded(lambda: _check_removal(model, tokenizer, keeps, tmp, reload=reload))
            row["removal_equals_masking"], row["save_reload"] = (results, results) if isinstance(results, str) \
                else results
        row["calibration"] = _guarded(lambda: _check_calibration(model, tokenizer, layers))
        row["merging"] = keeps if isinstance(keeps, str) else _guarded(
            lambda: _check_merging(model, tokenizer, keeps[0], tmp, reload=reload))
    return row


def summary(rows: list[dict]) -> dict:
    """Counts over the table: buildable types, those where every check passes, and of these the
    share where merging passes too."""
    buildable = [r for r in rows if r["status"] != "not buildable"]
    passing = [r for r in buildable if r["status"] == "supported" and all(r[c] == "pass" for c in CHECKS)]
    merging = [r for r in passing if all(r.get(c) == "pass" for c in MERGING_CHECKS)]
    return {"n_types": len(rows), "n_buildable": len(buildable), "n_passing": len(passing),
            "share_passing": len(passing) / max(len(buildable), 1), "n_merging": len(merging),
            "share_merging": len(merging) / max(len(passing), 1)}


def main(argv: list[str] | None = None) -> None:
    import transformers
    from tqdm.auto import tqdm

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=BENCH_RESULTS / "conformance.json")
    parser.add_argument("types", nargs="*", help="model types (default: every MoE causal LM transformers ships)")
    args = parser.parse_args(argv)
    torch.set_num_threads(min(2, torch.get_num_threads()))
    rows = [check_model_type(t) for t in tqdm(args.types or moe_model_types(), desc="conformance")]
    atomic_write_json(args.out, {"transformers": transformers.__version__, "versions": package_versions(),
                                 "summary": summary(rows), "rows": rows})
    print(json.dumps(summary(rows)))


if __name__ == "__main__":
    main()
