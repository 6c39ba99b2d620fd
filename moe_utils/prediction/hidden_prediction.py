"""The hidden-state predictor of routing: the next MoE layer's own router applied early.

Inference systems that keep experts off the accelerator prefetch the experts of MoE layer l+1
while layer l runs, by applying layer l+1's router to a hidden state that is already available
(Fate, arXiv 2502.12224; the pre-attention predictor of arXiv 2511.10676). This module measures
that predictor on real models, through their own modules, for any MoE that
:func:`moe_utils.models.loading.moe_layers` finds. It is not part of the paper (Tang et al. 2025), which
only studies the routing itself; the stage "routing prediction" compares it with predictors that
read the routing alone (:mod:`moe_utils.prediction.routing_prediction`).

Which hidden state the router of MoE layer l+1 sees, in the pre-norm decoder layers of transformers
(OLMoE, Qwen-MoE, Mixtral, DeepSeek, gpt-oss ...)::

    x_{l+1}  = output of decoder layer l          (the residual stream leaving layer l)
    m_{l+1}  = x_{l+1} + Attention_{l+1}(input_layernorm_{l+1}(x_{l+1}))
    router input of layer l+1 = post_attention_layernorm_{l+1}(m_{l+1})

When layer l has run, ``x_{l+1}`` is known but the attention of layer l+1 is not. The prefetcher
therefore scores ``router_{l+1}(norm_{l+1}(x_{l+1}))``: the exact input with layer l+1's attention
update left out, normalised by layer l+1's own pre-MoE norm (:func:`pre_moe_norm`). Predicting h
MoE layers ahead uses router and norm of layer l+h on the same ``x_{l+1}``. A dense decoder layer
between two MoE layers is skipped over the same way: the state used is always the output of the
decoder layer that holds MoE layer l.

The router is called through its own ``forward`` (so its own scoring, top-k and any correction
bias apply, and the capture hooks on it do not fire): the prediction ranks the router's own top-k
first, then the remaining experts by the router's logits where it returns them.
"""

from __future__ import annotations

import contextlib
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, NamedTuple, Sequence

import numpy as np
import torch
from torch import nn

from moe_utils.models.loading import MoELayer, moe_layers
from moe_utils.capture.routing import capture_routing
from moe_utils.capture.store import RoutingStore

#: Names of the norm a pre-norm decoder layer applies to the residual stream before its MoE block,
#: in order of preference (``post_attention_layernorm`` in every MoE of transformers 5 checked;
#: ``pre_feedforward_layernorm`` in the Gemma family).
PRE_MOE_NORMS = ("post_attention_layernorm", "pre_feedforward_layernorm", "ffn_norm")


def decoder_layer_of(model: nn.Module, block: nn.Module) -> nn.Module:
    """The module that holds ``block`` as a direct child: the decoder layer of an MoE block."""
    for module in model.modules():
        if any(child is block for child in module.children()):
            return module
    raise ValueError(f"{type(block).__name__} is not a child of any module of {type(model).__name__}")


def pre_moe_norm(decoder_layer: nn.Module) -> nn.Module | None:
    """The norm the decoder layer applies before its MoE block (:data:`PRE_MOE_NORMS`), or None
    when it has none of those (then the residual stream is given to the router as it is)."""
    return next((getattr(decoder_layer, name) for name in PRE_MOE_NORMS
                 if isinstance(getattr(decoder_layer, name, None), nn.Module)), None)


def router_ranking(layer: MoELayer, hidden: torch.Tensor, n_ranked: int) -> torch.Tensor:
    """``(N, n_ranked)`` experts of ``layer`` ranked for the hidden states ``hidden`` (N, H): the
    router's own top-k in its order, then the other experts by decreasing router logit.

    The router runs through its own ``forward`` (its scoring, top-k and bias, as in the model).
    Ranking beyond its top-k needs the logits: a router that returns none allows ``n_ranked <= k``.
    """
    output = layer.architecture.read_router_output(layer.router.forward(hidden))
    indices = output.indices.long()
    if n_ranked <= indices.shape[1]:
        return indices[:, :n_ranked]
    if output.logits is None:
        raise ValueError(f"MoE layer {layer.index}: its router returns no logits, so experts beyond its "
                         f"top-{indices.shape[1]} cannot be ranked; ask for n_ranked <= {indices.shape[1]}")
    logits = output.logits.float().reshape(len(indices), -1).clone()
    logits.scatter_(1, indices, float("inf"))  # the router's own choice sorts first; the rest by logit
    rest = logits.argsort(dim=1, descending=True, stable=True)[:, indices.shape[1]:n_ranked]
    return torch.cat([indices, rest], dim=1)


@dataclass
class HiddenStateProbe:
    """Forward hooks that, as each decoder layer holding MoE layer l finishes, rank the experts of
    MoE layer l+h (for every horizon h) from its output, for the real tokens of the batch.

    ``predictions[h]`` is filled as a list of (n_real, n_layers, n_ranked) arrays, one per forward
    pass, indexed by the *target* layer (rows of targets t < h stay -1).
    """

    layers: list[MoELayer]
    norms: list[nn.Module | None]
    horizons: tuple[int, ...]
    n_ranked: int
    predictions: dict[int, list[np.ndarray]] = field(default_factory=dict)
    _mask: torch.Tensor | None = None
    _batch: dict[int, np.ndarray] = field(default_factory=dict)

    def model_pre_hook(self, _module, args, kwargs):
        mask = kwargs.get("attention_mask")
        ids = kwargs.get("input_ids", args[0] if args else None)
        self._mask = (mask if mask is not None else torch.ones_like(ids)).reshape(-1).bool()
        n_real = int(self._mask.sum())
        self._batch = {h: np.full((n_real, len(self.layers), self.n_ranked), -1, dtype=np.int64)
                       for h in self.horizons}

    def layer_hook(self, source: int):
        def hook(_module, _inputs, output):
            state = output[0] if isinstance(output, (tuple, list)) else output
            state = state.reshape(-1, state.shape[-1])[self._mask.to(state.device)]
            for h in self.horizons:
                target = source + h
                if target >= len(self.layers):
                    continue
                layer, norm = self.layers[target], self.norms[target]
                weight = next(layer.router.parameters())
                x = state.to(device=weight.device, dtype=weight.dtype)
                ranked = router_ranking(layer, norm(x) if norm is not None else x, self.n_ranked)
                self._batch[h][:, target] = ranked.cpu().numpy()
        return hook

    def model_hook(self, _module, _inputs, _output):
        for h, array in self._batch.items():
            self.predictions.setdefault(h, []).append(array)
        self._batch = {}


@contextlib.contextmanager
def hidden_state_probe(model: nn.Module, horizons: Sequence[int], n_ranked: int) -> Iterator[HiddenStateProbe]:
    """Hook ``model`` so that every forward pass records the hidden-state predictor's rankings."""
    layers = moe_layers(model)
    decoders = [decoder_layer_of(model, layer.block) for layer in layers]
    probe = HiddenStateProbe(layers, [pre_moe_norm(d) for d in decoders], tuple(horizons), n_ranked)
    handles = [model.register_forward_pre_hook(probe.model_pre_hook, with_kwargs=True),
               model.register_forward_hook(probe.model_hook)]
    handles += [d.register_forward_hook(probe.layer_hook(i)) for i, d in enumerate(decoders)]
    try:
        yield probe
    finally:
        for handle in handles:
            handle.remove()


class HeldOutCapture(NamedTuple):
    """Routing of held-out texts (a verified store) and the hidden-state predictor's rankings:
    ``hidden[h]`` (n_tokens, n_layers, n_ranked) by target layer, -1 where no source layer exists."""

    store: RoutingStore
    hidden: dict[int, np.ndarray]


def capture_with_hidden_predictions(model: nn.Module, tokenizer, texts: Sequence[str], *, out_dir: str | Path,
                                    horizons: Sequence[int] = (1, 2, 3), n_ranked: int | None = None,
                                    labels: Sequence[str] | None = None, batch_size: int = 8,
                                    max_length: int = 512, record_probs: bool = False,
                                    data_spec: dict | None = None) -> HeldOutCapture:
    """Capture the routing of ``texts`` into a fresh store at ``out_dir`` (any earlier one is
    replaced: the predictions need the forward passes) with
    :func:`moe_utils.capture.routing.capture_routing`, while :func:`hidden_state_probe` ranks, at every
    MoE layer, the experts of the layers ``horizons`` ahead. ``n_ranked`` defaults to 2k."""
    if not horizons or min(horizons) < 1:
        raise ValueError(f"horizons must be positive layer counts, got {list(horizons)}")
    layers = moe_layers(model)
    n_ranked = n_ranked or min(2 * layers[0].top_k, layers[0].num_experts)
    out_dir = Path(out_dir)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    with hidden_state_probe(model, horizons, n_ranked) as probe:
        store = capture_routing(model, tokenizer, texts, out_dir=out_dir, labels=labels, batch_size=batch_size,
                                max_length=max_length, record_probs=record_probs, data_spec=data_spec,
                                progress=False)
    hidden = {h: np.concatenate(probe.predictions[h]) for h in horizons}
    if any(len(a) != store.n_tokens for a in hidden.values()):
        raise RuntimeError("the hidden-state predictions do not line up with the captured tokens")
    return HeldOutCapture(store, hidden)
