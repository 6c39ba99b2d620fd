"""Figures of the study. Each function returns a matplotlib Figure; the notebooks only display them.

One style (``plot_style.mplstyle``) is applied by :func:`use_style`, once per notebook.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib.figure import Figure

STYLE = Path(__file__).with_name("plot_style.mplstyle")


def use_style() -> None:
    plt.style.use(STYLE)


def expert_usage(usage: np.ndarray, *, title: str = "Share of routed slots per expert") -> Figure:
    """Heatmap of an (n_layers, E) usage matrix (each row sums to 1), with the uniform share marked."""
    n_layers, n_experts = usage.shape
    fig, ax = plt.subplots(figsize=(min(12, 2 + 0.35 * n_experts), 1.2 + 0.35 * n_layers))
    image = ax.imshow(usage * 100, aspect="auto", cmap="magma")
    ax.set_xlabel("expert")
    ax.set_ylabel("MoE layer")
    ax.set_xticks(range(0, n_experts, max(1, n_experts // 16)))
    ax.set_yticks(range(n_layers))
    ax.set_title(f"{title} (uniform = {100 / n_experts:.2f}%)")
    fig.colorbar(image, ax=ax, label="% of the layer's routed slots")
    return fig


def coactivation_heatmap(co: np.ndarray, n_experts: int, *, lift: bool = True,
                         title: str | None = None) -> Figure:
    """The paper's Fig 2: pairwise co-activation of all experts, layer blocks outlined.

    With ``lift`` the colour is log2 of P(a, b) / (P(a) P(b)): above 0, the pair fires together
    more often than independent choices would; the diagonal is hidden.
    """
    n_e = co.shape[0]
    if lift:
        p = np.diag(co)
        with np.errstate(divide="ignore", invalid="ignore"):
            values = np.log2(co / np.outer(p, p))
        values[~np.isfinite(values)] = np.nan
        np.fill_diagonal(values, np.nan)
        bound = np.nanpercentile(np.abs(values), 99) if np.isfinite(values).any() else 1.0
        kwargs = dict(cmap="RdBu_r", vmin=-bound, vmax=bound)
        label = "log2 lift of co-selection"
    else:
        values, kwargs, label = co, dict(cmap="viridis"), "P(both selected)"
    fig, ax = plt.subplots(figsize=(7.2, 6.2))
    image = ax.imshow(values, interpolation="nearest", **kwargs)
    for edge in range(n_experts, n_e, n_experts):
        ax.axhline(edge - 0.5, color="k", lw=0.4)
        ax.axvline(edge - 0.5, color="k", lw=0.4)
    ticks = np.arange(n_experts / 2 - 0.5, n_e, n_experts)
    ax.set_xticks(ticks, [f"L{i}" for i in range(len(ticks))])
    ax.set_yticks(ticks, [f"L{i}" for i in range(len(ticks))])
    ax.set_xlabel("expert (grouped by MoE layer)")
    ax.set_ylabel("expert (grouped by MoE layer)")
    ax.set_title(title or "Expert co-activation across layers")
    fig.colorbar(image, ax=ax, label=label, shrink=0.8)
    return fig


def routing_weight_histogram(weights: np.ndarray, *, title: str = "Routing weights of selected experts") -> Figure:
    """Distribution of the top-k routing weights, one line per rank (1st, 2nd ... choice)."""
    fig, ax = plt.subplots(figsize=(6, 3.4))
    flat = weights.reshape(-1, weights.shape[-1])
    for rank in range(flat.shape[1]):
        ax.hist(np.sort(flat, axis=1)[:, ::-1][:, rank], bins=50, histtype="step", label=f"choice {rank + 1}")
    ax.set_xlabel("routing weight")
    ax.set_ylabel("token-layer slots")
    ax.set_title(title)
    ax.legend()
    return fig


def label_usage_profiles(profiles: pd.DataFrame) -> Figure:
    """Per-label expert-selection frequency (labels as rows, experts of all layers as columns)."""
    fig, ax = plt.subplots(figsize=(10, 0.6 + 0.45 * len(profiles)))
    image = ax.imshow(profiles.to_numpy() * 100, aspect="auto", cmap="magma")
    ax.set_yticks(range(len(profiles)), profiles.index)
    ax.set_xlabel("expert row of X (layer-major)")
    ax.set_title("Expert-selection frequency per label")
    fig.colorbar(image, ax=ax, label="% of tokens selecting the expert")
    return fig
