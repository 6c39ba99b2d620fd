"""Figures of the controls: collaboration against token identity, chance and refits
(:mod:`moe_utils.patterns.token_null`, :mod:`moe_utils.patterns.hsdl_controls`). Each returns a matplotlib Figure."""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from moe_utils.common.plotting import layer_grid

ORDER_NAMES = {2: "pairs", 3: "triplets"}


def lift_heatmaps(lifts: dict[str, np.ndarray], n_experts: int, *,
                  title: str = "Cross-layer co-activation: plain lift and lift given the token") -> Figure:
    """Fig 2 in several forms side by side (name -> (N_e, N_e) lift, NaN within layers), as log2
    lift on one colour scale: above 0 a pair fires together more often than its null predicts."""
    logs = {}
    for name, lift in lifts.items():
        with np.errstate(divide="ignore", invalid="ignore"):
            values = np.log2(lift)
        values[~np.isfinite(values)] = np.nan
        logs[name] = values
    finite = np.concatenate([np.abs(v[np.isfinite(v)]) for v in logs.values()])
    bound = float(np.percentile(finite, 99)) if finite.size else 1.0
    fig, axes = plt.subplots(1, len(logs), figsize=(5.2 * len(logs), 4.8), squeeze=False)
    for ax, (name, values) in zip(axes[0], logs.items()):
        image = ax.imshow(values, cmap="RdBu_r", vmin=-bound, vmax=bound, interpolation="nearest")
        layer_grid(ax, values.shape[0], n_experts)
        ax.set_title(name)
    fig.colorbar(image, ax=axes[0].tolist(), label="log2 lift (observed / expected)", shrink=0.8)
    fig.suptitle(title)
    return fig


def coverage_with_chance(observed: pd.DataFrame, chances: dict[str, pd.DataFrame], *,
                         reference: tuple[float, float] | None = (10.0, 0.6),
                         title: str = "Atoms among the most frequent co-selected expert sets") -> Figure:
    """The paper's Fig 6 with its chance levels: the atoms' coverage per order (solid), and for
    each kind of random atom (name -> :func:`moe_utils.patterns.hsdl_controls.coverage_chance`) the mean
    over draws (dashed, dotted) with the interval of the draws shaded; star: the paper's point."""
    fig, axes = plt.subplots(1, observed["order"].nunique(), figsize=(10, 3.8), squeeze=False, sharey=True)
    styles = ["--", ":", "-."]
    for ax, (order, group) in zip(axes[0], observed.groupby("order")):
        ax.plot(group["top_percent"], group["coverage"] * 100, marker="o", color="C0", label="HSDL atoms")
        for i, (name, chance) in enumerate(chances.items()):
            base = chance[chance["order"] == order]
            ax.plot(base["top_percent"], base["mean"] * 100, ls=styles[i % 3], color=f"C{i + 1}", label=name)
            ax.fill_between(base["top_percent"], base["low"] * 100, base["high"] * 100, color=f"C{i + 1}", alpha=0.2)
        if reference is not None:
            ax.scatter([reference[0]], [reference[1] * 100], marker="*", s=120, color="k", zorder=3,
                       label="paper (Phi-3.5-MoE)")
        ax.set_xscale("log")
        ax.set_xlabel("top k% most frequent co-selected sets")
        ax.set_title(ORDER_NAMES.get(order, f"{order}-sets"))
        ax.set_ylim(-2, 102)
    axes[0][0].set_ylabel("% of atoms covered")
    axes[0][0].legend(fontsize=8)
    fig.suptitle(title)
    return fig


def atom_stability(matched: dict[str, np.ndarray], *,
                   title: str = "Are the atoms reproduced by another fit?") -> Figure:
    """For each comparison (name -> Jaccard of the one-to-one matched atoms), the share of atoms
    whose match has at least a given Jaccard similarity (1 = the same experts)."""
    fig, ax = plt.subplots(figsize=(6, 3.8))
    grid = np.linspace(0, 1, 101)
    for name, jaccard in matched.items():
        jaccard = np.asarray(jaccard)
        if jaccard.size:
            ax.plot(grid, [(jaccard >= g - 1e-12).mean() * 100 for g in grid], label=f"{name} ({jaccard.size} atoms)")
    ax.set_xlabel("Jaccard similarity of the matched atom's experts")
    ax.set_ylabel("% of atoms matched at least this well")
    ax.set_ylim(-2, 102)
    ax.legend(fontsize=8)
    ax.set_title(title)
    return fig
