"""Figures of the study. Each function returns a matplotlib Figure; the notebooks only display them.

One style (``plot_style.mplstyle``) is applied by :func:`use_style`, once per notebook.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from moe_utils.evaluation.metrics import lower_is_better

STYLE = Path(__file__).with_name("plot_style.mplstyle")


def use_style() -> None:
    """The book's look for figures, and HTML escaping of every cell of every pandas table a stage
    shows (``Styler`` does not escape by default, and table cells hold model and dataset text:
    token strings, atom labels, question text)."""
    plt.style.use(STYLE)
    pd.set_option("styler.format.escape", "html")


def glue_figure(name: str, fig: Figure) -> None:
    """Glue ``fig`` for a ``{glue:figure}`` directive and close it, so the cell does not show it twice."""
    from myst_nb import glue

    glue(name, fig, display=False)
    plt.close(fig)


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


def layer_grid(ax, n_e: int, n_experts: int) -> None:
    """Lines between the MoE layers of an (expert x expert) image, and one tick per layer (L0, L1, ...)."""
    for edge in range(n_experts, n_e, n_experts):
        ax.axhline(edge - 0.5, color="k", lw=0.4)
        ax.axvline(edge - 0.5, color="k", lw=0.4)
    ticks = np.arange(n_experts / 2 - 0.5, n_e, n_experts)
    ax.set_xticks(ticks, [f"L{i}" for i in range(len(ticks))])
    ax.set_yticks(ticks, [f"L{i}" for i in range(len(ticks))])


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
    layer_grid(ax, n_e, n_experts)
    ax.set_xlabel("expert (grouped by MoE layer)")
    ax.set_ylabel("expert (grouped by MoE layer)")
    ax.set_title(title or "Expert co-activation across layers")
    fig.colorbar(image, ax=ax, label=label, shrink=0.8)
    return fig


def training_curves(curve: pd.DataFrame) -> Figure:
    """Language-model loss and load-balancing loss against step (columns step, lm_loss, aux_loss)."""
    fig, (ax_lm, ax_aux) = plt.subplots(1, 2, figsize=(9, 3.4))
    ax_lm.plot(curve.step, curve.lm_loss)
    ax_lm.set(xlabel="step", ylabel="cross-entropy (nats/token)", title="Language-model loss")
    ax_aux.plot(curve.step, curve.aux_loss, color="C1")
    ax_aux.axhline(1.0, color="grey", lw=0.8, ls="--")
    ax_aux.set(xlabel="step", ylabel="auxiliary loss", title="Load-balancing loss (1 = balanced)")
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


# ------------------------------------------------------------------------------ HSDL (stage 2)
def hsdl_loss_curves(history: dict, *, title: str = "HSDL loss terms during training") -> Figure:
    """One panel per level: the named loss terms (``level<k>.<term>`` of ``HSDL.loss_history_``) per step."""
    levels = sorted({int(name.split(".")[0][5:]) for name in history if name.startswith("level")})
    fig, axes = plt.subplots(1, len(levels), figsize=(3.6 * len(levels) + 0.6, 3.2), squeeze=False, sharex=True)
    steps = history.get("step") or list(range(1, len(history["total"]) + 1))
    for ax, level in zip(axes[0], levels):
        for term, label in (("sparse", "sparse (row L-inf)"), ("hier", "hier (usage-weighted L1)"),
                            ("rec", "rec (usage-weighted L1 error)")):
            values = np.asarray(history[f"level{level}.{term}"], dtype=float)
            ax.plot(steps, np.where(values > 0, values, np.nan), label=label)
        ax.set_yscale("log")
        ax.set_xlabel("optimisation step")
        ax.set_title(f"level {level}")
    axes[0][0].set_ylabel("term value (unweighted)")
    axes[0][-1].legend(fontsize=8)
    fig.suptitle(title)
    return fig


def atom_size_distribution(tables: pd.DataFrame, *, title: str = "How big are the atoms?") -> Figure:
    """Experts per atom and layers spanned per atom, one bar group per level (live atoms only)."""
    live = tables[tables["alive"]]
    levels = sorted(live["level"].unique())
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.2))
    for ax, column, label in ((axes[0], "n_experts", "experts per atom"), (axes[1], "n_layers", "MoE layers spanned")):
        top = int(live[column].max()) if len(live) else 1
        bins = np.arange(0, top + 2)
        width = 0.8 / max(1, len(levels))
        for i, level in enumerate(levels):
            counts = np.bincount(live.loc[live["level"] == level, column], minlength=top + 1)
            ax.bar(bins[:-1] + (i - (len(levels) - 1) / 2) * width, counts / max(1, counts.sum()), width=width,
                   label=f"level {level} ({counts.sum()} atoms)")
        ax.set_xlabel(label)
        ax.set_ylabel("share of live atoms")
        ax.set_xticks(bins[:-1][:: max(1, len(bins) // 12)])
    axes[1].legend()
    fig.suptitle(title)
    return fig


def atom_maps(dictionary: np.ndarray, layout: tuple[int, int], atoms, *, titles=None, ncols: int = 4,
              title: str = "Atoms as layer x expert maps") -> Figure:
    """Selected atoms (columns of ``dictionary``) drawn as (n_layers, n_experts) heatmaps in [0, 1]."""
    n_layers, n_experts = layout
    atoms = list(atoms)
    nrows = max(1, -(-len(atoms) // ncols))
    fig, axes = plt.subplots(nrows, ncols, figsize=(2.6 * ncols, 0.6 + (0.9 + 0.16 * n_layers) * nrows),
                             squeeze=False)
    image = None
    for i, ax in enumerate(axes.ravel()):
        if i >= len(atoms):
            ax.axis("off")
            continue
        grid = np.asarray(dictionary[:, atoms[i]]).reshape(n_layers, n_experts)
        image = ax.imshow(grid, aspect="auto", cmap="Greys", vmin=0, vmax=1, interpolation="nearest")
        ax.set_title(titles[i] if titles is not None else f"atom {atoms[i]}", fontsize=8)
        ax.set_xticks([])
        ax.set_yticks(range(0, n_layers, max(1, n_layers // 4)))
        ax.tick_params(labelsize=7)
    for ax in axes[:, 0]:
        ax.set_ylabel("layer", fontsize=8)
    if image is not None:
        fig.colorbar(image, ax=axes, shrink=0.6, label="dictionary entry")
    fig.suptitle(title)
    return fig


def hierarchy_tree(edges: list[pd.DataFrame], usages: list[np.ndarray], *, max_parents: int = 12,
                   title: str = "Which finer atoms make up each atom") -> Figure:
    """Levels as rows of nodes (top: level 1), the ``max_parents`` most used level-1 atoms and their
    descendants; edge width and opacity follow each child's share of its parent (``patterns.hierarchy``)."""
    fig, ax = plt.subplots(figsize=(9, 1.4 + 1.5 * (len(edges) + 1)))
    current = list(np.argsort(-usages[0])[:max_parents])
    positions = {(1, a): (i, 0.0) for i, a in enumerate(current)}
    for depth, frame in enumerate(edges, start=1):
        frame = frame[frame["parent"].isin(current)]
        children = []
        for child, group in frame.groupby("child"):
            xs = [positions[(depth, p)][0] for p in group["parent"]]
            children.append((float(np.mean(xs)), child))
        children.sort()
        span = max(1, len(current) - 1)
        for i, (_, child) in enumerate(children):
            x = i * span / max(1, len(children) - 1) if len(children) > 1 else span / 2
            positions[(depth + 1, child)] = (x, -float(depth))
        for row in frame.itertuples():
            (x0, y0), (x1, y1) = positions[(depth, row.parent)], positions[(depth + 1, row.child)]
            ax.plot([x0, x1], [y0, y1], color="tab:blue", alpha=0.2 + 0.8 * row.share, lw=0.5 + 2.5 * row.share)
        current = [c for _, c in children]
    for (level, atom), (x, y) in positions.items():
        size = usages[level - 1][atom] if level - 1 < len(usages) else 0.0
        ax.scatter([x], [y], s=40 + 1500 * size, color="tab:orange", zorder=3, edgecolor="k", lw=0.5)
        ax.annotate(str(atom), (x, y), ha="center", va="center", fontsize=6, zorder=4)
    ax.set_yticks([-d for d in range(len(edges) + 1)], [f"level {d + 1}" for d in range(len(edges) + 1)])
    ax.set_xticks([])
    ax.spines[["left", "bottom"]].set_visible(False)
    ax.set_title(title)
    return fig


def coverage_curves(observed: pd.DataFrame, chance: pd.DataFrame | None = None, *,
                    reference: tuple[float, float] | None = (10.0, 0.6),
                    title: str = "Atoms among the most frequent co-selected expert sets") -> Figure:
    """The paper's Fig 6: coverage against top k%, per order (pairs, triplets), with random atoms
    of the same sizes dashed and the paper's reported point (60% of atoms in the top 10%) marked."""
    fig, ax = plt.subplots(figsize=(6, 3.8))
    names = {2: "pairs", 3: "triplets"}
    for i, (order, group) in enumerate(observed.groupby("order")):
        color = f"C{i}"
        ax.plot(group["top_percent"], group["coverage"] * 100, marker="o", color=color,
                label=f"HSDL atoms, {names.get(order, f'{order}-sets')}")
        if chance is not None:
            base = chance[chance["order"] == order]
            ax.plot(base["top_percent"], base["coverage"] * 100, ls="--", color=color,
                    label=f"random atoms, {names.get(order, f'{order}-sets')}")
    if reference is not None:
        ax.scatter([reference[0]], [reference[1] * 100], marker="*", s=120, color="k", zorder=3,
                   label="paper (Phi-3.5-MoE)")
    ax.set_xscale("log")
    ax.set_xlabel("top k% most frequent co-selected sets (exhaustive counting)")
    ax.set_ylabel("% of atoms covered")
    ax.set_ylim(-2, 102)
    ax.legend(fontsize=8)
    ax.set_title(title)
    return fig


# ------------------------------------------------------------------------ annotation (stage 3)
def _annotated_heatmap(ax, values: pd.DataFrame, *, cmap: str, vmin: float, vmax: float, fmt: str = "{:.2f}"):
    image = ax.imshow(values.to_numpy(), cmap=cmap, vmin=vmin, vmax=vmax)
    ax.set_xticks(range(values.shape[1]), values.columns, rotation=35, ha="right")
    ax.set_yticks(range(values.shape[0]), values.index)
    for (i, j), v in np.ndenumerate(values.to_numpy()):
        r, g, b, _ = image.cmap(image.norm(v))
        dark = 0.299 * r + 0.587 * g + 0.114 * b < 0.5  # white text on dark cells
        ax.text(j, i, fmt.format(v), ha="center", va="center", fontsize=8, color="w" if dark else "k")
    return image


def domain_similarity(profiles: pd.DataFrame, similarity: pd.DataFrame, centered: pd.DataFrame | None = None, *,
                      n_experts: int | None = None, title: str = "How similarly do domains use experts?") -> Figure:
    """The paper's Fig 7: each domain's expert-selection frequency distribution (rows of ``profiles``,
    experts of all layers in layer-major order) and the cosine similarity of these distributions;
    with ``centered``, the similarity after removing the mean profile as a third panel."""
    panels = 3 if centered is not None else 2
    fig, axes = plt.subplots(1, panels, figsize=(4.6 * panels + 1.5, 4.2),
                             gridspec_kw={"width_ratios": [1.6] + [1] * (panels - 1)})
    ax = axes[0]
    for i, (name, row) in enumerate(profiles.iterrows()):
        ax.plot(np.arange(row.size), row.to_numpy() * 100, lw=0.9, color=f"C{i}", label=name)
    if n_experts:
        for edge in range(n_experts, profiles.shape[1], n_experts):
            ax.axvline(edge - 0.5, color="grey", lw=0.4)
    ax.set_xlabel("expert (layer-major order)")
    ax.set_ylabel("% of the domain's expert selections")
    ax.set_title("Expert-selection frequency per domain")
    ax.legend(fontsize=8)
    low = float(np.floor(similarity.to_numpy().min() * 20) / 20)
    image = _annotated_heatmap(axes[1], similarity, cmap="viridis", vmin=min(low, 0.95), vmax=1.0)
    axes[1].set_title("Cosine similarity")
    fig.colorbar(image, ax=axes[1], shrink=0.75)
    if centered is not None:
        image = _annotated_heatmap(axes[2], centered, cmap="RdBu_r", vmin=-1.0, vmax=1.0)
        axes[2].set_title("Cosine after removing the mean profile")
        fig.colorbar(image, ax=axes[2], shrink=0.75)
    fig.suptitle(title)
    return fig


def domain_similarity_intervals(pairs: pd.DataFrame, within: pd.DataFrame, *, confidence: float = 0.95,
                                title: str = "How sure is the ranking of domain pairs?") -> Figure:
    """Fig 7's pairs with questions resampled (:func:`moe_utils.stages.annotation.similarity_intervals`):
    each pair's cosine with its interval (filled dot, labelled with the share of resamples in which it
    is the closest), its cosine at half the questions (open dot), and below them each domain's
    split-half cosine with its range over splits (grey squares): the reference a cross-domain cosine
    at half size has to stay under to say the two domains differ."""
    rows = len(pairs) + len(within)
    fig, ax = plt.subplots(figsize=(7.5, 1.2 + 0.28 * rows))
    y = np.arange(len(pairs))[::-1] + len(within) + 1

    def spread(frame):  # a percentile interval need not hold its point estimate: bars never negative
        return np.clip([frame["cosine"] - frame["low"], frame["high"] - frame["cosine"]], 0, None)

    ax.errorbar(pairs["cosine"], y, xerr=spread(pairs), fmt="o",
                color="C0", ms=4, capsize=2, label=f"pair, all questions ({confidence:.0%} interval)")
    ax.scatter(pairs["cosine at half size"], y, facecolors="none", edgecolors="C0", s=22,
               label="pair, half the questions")
    for yy, (_, row) in zip(y, pairs.iterrows()):
        ax.annotate(f"closest in {row['closest_share']:.0%}", (row["high"], yy), xytext=(4, -3),
                    textcoords="offset points", fontsize=6.5, color="C0")
    y_within = np.arange(len(within))[::-1]
    ax.errorbar(within["cosine"], y_within, xerr=spread(within), fmt="s", color="0.4", ms=4, capsize=2, label="domain with itself: two random halves")
    labels = [f"{a} / {b}" for a, b in zip(pairs["a"], pairs["b"])] + [f"{d} (split half)" for d in within["domain"]]
    ax.set_yticks(list(y) + list(y_within), labels, fontsize=7)
    ax.set_xlabel("cosine similarity of expert-selection frequencies")
    ax.legend(fontsize=7, loc="lower left", bbox_to_anchor=(0, 1.02), ncol=2)
    ax.set_title(title, pad=40)
    return fig


def enrichment_heatmap(enrichment: pd.DataFrame, atoms, *, labels: dict | None = None, alpha: float = 0.01,
                       title: str = "Which domains each atom prefers",
                       given_token: pd.DataFrame | None = None) -> Figure:
    """Atoms (rows, in the given order) x categories: log2 lift of the category for the atom
    (``annotation.enrichment``, any unit), with a dot where the corrected q-value is below ``alpha``;
    with ``given_token`` (the same test holding the token fixed) a ring where that one is too."""
    atoms = list(atoms)
    table = enrichment[enrichment["atom"].isin(atoms)]
    lift = table.pivot(index="atom", columns="category", values="lift").reindex(atoms)
    q = table.pivot(index="atom", columns="category", values="q").reindex(atoms)
    with np.errstate(divide="ignore"):
        values = np.log2(lift.to_numpy(dtype=float))
    values = np.clip(np.nan_to_num(values, nan=0.0, neginf=-3.0), -3, 3)
    fig, ax = plt.subplots(figsize=(2.2 + 0.9 * lift.shape[1] + (3.2 if labels else 0), 1.0 + 0.24 * len(atoms)))
    image = ax.imshow(values, cmap="RdBu_r", vmin=-3, vmax=3, aspect="auto")
    rows, cols = np.nonzero(q.to_numpy(dtype=float) < alpha)
    ax.scatter(cols, rows, s=9, color="k")
    if given_token is not None:
        q_type = (given_token[given_token["atom"].isin(atoms)].pivot(index="atom", columns="category", values="q")
                  .reindex(index=atoms, columns=lift.columns))
        rows, cols = np.nonzero(q_type.to_numpy(dtype=float) < alpha)
        ax.scatter(cols, rows, s=60, facecolors="none", edgecolors="k", linewidths=0.8)
    names = [f"{a}: {labels.get(a, '')[:42]}" if labels else str(a) for a in atoms]
    ax.set_yticks(range(len(atoms)), names, fontsize=7)
    ax.set_xticks(range(lift.shape[1]), lift.columns, rotation=35, ha="right")
    ax.set_ylabel("atom")
    fig.colorbar(image, ax=ax, label="log2 lift (clipped to ±3)", shrink=0.6)
    rings = "; rings: also holding the token fixed" if given_token is not None else ""
    ax.set_title(f"{title}\n(dots: q < {alpha:g}{rings})")
    return fig


def token_class_heatmap(classes: pd.DataFrame, base: pd.Series, atoms, *, labels: dict | None = None,
                        title: str = "Token classes each atom explains") -> Figure:
    """Atoms x token classes: log2 of each class's share among the atom's tokens over its share among
    all tokens (``annotation.class_profile``); blank where the atom explains no token of the class;
    classes no token has are left out."""
    atoms = list(atoms)
    columns = [c for c in classes.columns if base.get(c, 0) > 0]
    shares = classes.loc[atoms, columns].to_numpy(dtype=float)
    with np.errstate(divide="ignore"):
        values = np.clip(np.log2(shares / base[columns].to_numpy(dtype=float)), -3, 3)
    values[shares == 0] = np.nan  # the atom explains no token of the class: left blank
    fig, ax = plt.subplots(figsize=(2.2 + 0.55 * len(columns) + (3.2 if labels else 0), 1.0 + 0.24 * len(atoms)))
    cmap = plt.get_cmap("PuOr").with_extremes(bad="white")
    image = ax.imshow(values, cmap=cmap, vmin=-3, vmax=3, aspect="auto")
    names = [f"{a}: {labels.get(a, '')[:42]}" if labels else str(a) for a in atoms]
    ax.set_yticks(range(len(atoms)), names, fontsize=7)
    ax.set_xticks(range(len(columns)), columns, rotation=40, ha="right")
    fig.colorbar(image, ax=ax, label="log2 lift over the base rate (clipped to ±3)", shrink=0.6)
    ax.set_title(title)
    return fig


# --------------------------------------------------------------------------- pruning (stage 4)
def pruning_curves(summary: pd.DataFrame, *, tasks=None, ncols: int = 4,
                   title: str = "Score against the share of experts pruned") -> Figure:
    """The paper's Fig 8: one panel per task, its primary metric against the pruning ratio, one line
    per method from the unpruned score at 0%; methods with several seeds (random) as their mean
    with a band of ± one standard deviation. ``summary`` is :func:`moe_utils.evaluation.pruning_eval.curve_summary`."""
    tasks = list(dict.fromkeys(summary["task"])) if tasks is None else list(tasks)
    methods = [m for m in dict.fromkeys(summary["method"]) if m != "unpruned"]
    nrows = max(1, -(-len(tasks) // ncols))
    fig, axes = plt.subplots(nrows, ncols, figsize=(3.2 * ncols, 0.8 + 2.6 * nrows), squeeze=False)
    for ax, task in zip(axes.ravel(), tasks):
        rows = summary[summary["task"] == task]
        base = rows[rows["method"] == "unpruned"]
        for i, method in enumerate(methods):
            part = pd.concat([base, rows[rows["method"] == method]]).sort_values("ratio")
            x, y, s = part["ratio"].to_numpy() * 100, part["mean"].to_numpy(), part["std"].to_numpy()
            style = dict(color="grey", ls="--") if method == "random" else dict(color=f"C{i}")
            ax.plot(x, y, marker="o", ms=3, lw=1.2, label=method, **style)
            if (part["n_seeds"] > 1).any():
                ax.fill_between(x, y - s, y + s, color=style["color"], alpha=0.2, lw=0)
        metric = rows["metric"].iloc[0]
        better = "lower" if lower_is_better(metric) else "higher"
        ax.set_title(f"{task}\n{metric} ({better} is better)", fontsize=8)
        ax.tick_params(labelsize=7)
        if "perplexity" in metric:
            ax.set_yscale("log")
    for ax in axes.ravel()[len(tasks):]:
        ax.axis("off")
    for ax in axes[-1]:
        ax.set_xlabel("% of routed experts pruned", fontsize=8)
    handles, labels = axes.ravel()[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncols=min(len(labels), 8), fontsize=8)
    fig.suptitle(title)
    return fig


def pruning_mask_maps(masks, layout: tuple[int, int], *, ncols: int = 5,
                      title: str = "Which experts each method keeps") -> Figure:
    """Keep-masks (``moe_utils.compression.pruning.PruningMask``) as (layer x expert) maps: dark = kept."""
    n_layers, n_experts = layout
    masks = list(masks)
    nrows = max(1, -(-len(masks) // ncols))
    fig, axes = plt.subplots(nrows, ncols, figsize=(2.4 * ncols, 0.6 + (0.8 + 0.16 * n_layers) * nrows),
                             squeeze=False)
    for ax, mask in zip(axes.ravel(), masks):
        ax.imshow(mask.keep.reshape(n_layers, n_experts), aspect="auto", cmap="Greys", vmin=0, vmax=1.3,
                  interpolation="nearest")
        ax.set_title(f"{mask.label}: {mask.pruned_share:.0%} pruned", fontsize=8)
        ax.set_xticks([])
        ax.set_yticks(range(0, n_layers, max(1, n_layers // 4)))
        ax.tick_params(labelsize=7)
    for ax in axes.ravel()[len(masks):]:
        ax.axis("off")
    for ax in axes[:, 0]:
        ax.set_ylabel("layer", fontsize=8)
    fig.suptitle(title)
    return fig


# ---------------------------------------------------------------- MMLU-Pro results (stage 5)
def _cell_text(ax, image, values: np.ndarray, fmt: str) -> None:
    for (i, j), v in np.ndenumerate(values):
        if np.isfinite(v):
            r, g, b, _ = image.cmap(image.norm(v))
            dark = 0.299 * r + 0.587 * g + 0.114 * b < 0.5
            ax.text(j, i, fmt.format(v), ha="center", va="center", fontsize=8, color="w" if dark else "k")


def domain_change_heatmaps(matrices: dict, *, label: str, lower_is_better: bool, subtitles: dict | None = None,
                           title: str = "Pruned for one domain, evaluated on every domain") -> Figure:
    """The paper's Fig 9: one heatmap per pruning method of the relative change (in %) of a metric,
    rows = the domain the pruning was fitted on, columns = the domain evaluated; red is worse
    (perplexity up or accuracy down) on one colour scale shared by the panels, the diagonal boxed."""
    names = list(matrices)
    values = {n: matrices[n].to_numpy(dtype=float) * 100 for n in names}
    finite = np.concatenate([v[np.isfinite(v)] for v in values.values()])
    bound = float(np.abs(finite).max()) if finite.size else 1.0
    k = max(m.shape[0] for m in matrices.values())
    fig, axes = plt.subplots(1, len(names), figsize=(1.2 + (1.0 + 0.75 * k) * len(names), 1.6 + 0.7 * k),
                             squeeze=False)
    cmap = "RdBu_r" if lower_is_better else "RdBu"
    for ax, name in zip(axes[0], names):
        frame = matrices[name]
        image = ax.imshow(values[name], cmap=cmap, vmin=-bound, vmax=bound)
        _cell_text(ax, image, values[name], "{:+.1f}")
        for i in range(min(frame.shape)):
            ax.add_patch(plt.Rectangle((i - 0.5, i - 0.5), 1, 1, fill=False, lw=1.6, color="k"))
        ax.set_xticks(range(frame.shape[1]), frame.columns, rotation=35, ha="right")
        ax.set_yticks(range(frame.shape[0]), frame.index)
        ax.set_xlabel("evaluated on")
        ax.set_ylabel("pruned for")
        ax.set_title(name + (f"\n{subtitles[name]}" if subtitles and name in subtitles else ""), fontsize=9)
    fig.colorbar(image, ax=list(axes[0]), shrink=0.8, label=f"{label}: change from unpruned (%)")
    fig.suptitle(title)
    return fig


def domain_mask_overlap(jaccard: pd.DataFrame, kept: pd.DataFrame, *,
                        title: str = "Do domains keep different experts?") -> Figure:
    """Left: Jaccard similarity of the experts pruned for each pair of domains (1 = the same experts);
    right: experts kept per MoE layer for each domain (rows: domains, columns: layers)."""
    fig, axes = plt.subplots(1, 2, figsize=(10, 1.8 + 0.55 * len(jaccard)),
                             gridspec_kw={"width_ratios": [1, max(1.0, kept.shape[1] / len(jaccard))]})
    image = axes[0].imshow(jaccard.to_numpy(), cmap="viridis", vmin=0, vmax=1)
    _cell_text(axes[0], image, jaccard.to_numpy(), "{:.2f}")
    axes[0].set_xticks(range(len(jaccard)), jaccard.columns, rotation=35, ha="right")
    axes[0].set_yticks(range(len(jaccard)), jaccard.index)
    axes[0].set_title("Jaccard similarity of the pruned experts")
    fig.colorbar(image, ax=axes[0], shrink=0.8)
    image = axes[1].imshow(kept.to_numpy(), cmap="magma", aspect="auto", vmin=0)
    _cell_text(axes[1], image, kept.to_numpy().astype(float), "{:.0f}")
    axes[1].set_xticks(range(kept.shape[1]), kept.columns)
    axes[1].set_yticks(range(len(kept)), kept.index)
    axes[1].set_xlabel("MoE layer")
    axes[1].set_title("Experts kept per layer")
    fig.suptitle(title)
    return fig


def accuracy_intervals(scores: pd.DataFrame, *, chance: float | None = None,
                       title: str = "Multiple-choice accuracy per category") -> Figure:
    """Accuracies (``value``) with their intervals (``low``, ``high``) per ``category`` (x) and
    ``model`` (one marker colour each); the dashed line is uniform guessing."""
    models = list(dict.fromkeys(scores["model"]))
    categories = list(dict.fromkeys(scores["category"]))
    fig, ax = plt.subplots(figsize=(max(6.0, 1.3 * len(categories) + 2), 3.8))
    width = 0.8 / max(1, len(models))
    for m, name in enumerate(models):
        part = scores[scores["model"] == name].set_index("category").reindex(categories)
        x = np.arange(len(categories)) - 0.4 + width * (m + 0.5)
        ax.errorbar(x, part["value"] * 100, yerr=[(part["value"] - part["low"]) * 100, (part["high"] - part["value"]) * 100],
                    fmt="o", ms=4, capsize=2, color=f"C{m}", label=name)
    if chance is not None:
        ax.axhline(chance * 100, ls="--", color="grey", lw=1, label="chance")
    ax.set_xticks(range(len(categories)), categories, rotation=20, ha="right")
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(bottom=0)
    ax.legend(fontsize=7, ncols=2)
    ax.set_title(title)
    return fig


def category_breakdown_curves(breakdown: pd.DataFrame, *, label: str, ncols: int = 4,
                              title: str = "Which categories break first?") -> Figure:
    """Stage 4's pruning, per method (panel): relative change (%) of ``label`` per MMLU-Pro category
    (line) against the share of experts pruned; the band spans the seeds of random masks."""
    methods = list(dict.fromkeys(breakdown["method"]))
    categories = list(dict.fromkeys(breakdown["category"]))
    if not methods:
        fig, ax = plt.subplots(figsize=(5, 1.5))
        ax.text(0.5, 0.5, "no pruning results to show", ha="center", va="center")
        ax.axis("off")
        return fig
    ncols = min(ncols, len(methods))
    nrows = int(np.ceil(len(methods) / ncols))
    fig, axes = plt.subplots(nrows, ncols, figsize=(3.2 * ncols, 2.6 * nrows + 0.6), squeeze=False,
                             sharex=True, sharey=True)
    for ax, method in zip(axes.ravel(), methods):
        part = breakdown[breakdown["method"] == method]
        for c, category in enumerate(categories):
            rows = part[part["category"] == category].sort_values("ratio")
            ax.plot(rows["ratio"] * 100, rows["change"] * 100, marker="o", ms=3, color=f"C{c}", label=category)
            if (rows["n_seeds"] > 1).any():
                ax.fill_between(rows["ratio"] * 100, rows["change_min"] * 100, rows["change_max"] * 100,
                                color=f"C{c}", alpha=0.15, lw=0)
        ax.axhline(0, color="grey", lw=0.6)
        ax.set_title(method, fontsize=9)
    for ax in axes.ravel()[len(methods):]:
        ax.axis("off")
    for ax in axes[-1]:
        ax.set_xlabel("experts pruned (%)")
    for ax in axes[:, 0]:
        ax.set_ylabel(f"{label} change (%)")
    axes[0, 0].legend(fontsize=7)
    fig.suptitle(title)
    return fig


# ------------------------------------------------------------------ routing prediction (stage 6)
def recall_by_layer(frame: pd.DataFrame, *, k: int,
                    title: str = "How well is each layer's top-k predicted one layer ahead?") -> Figure:
    """Recall@k (``recall`` with ``low``/``high``) against the predicted MoE ``layer``, one line
    and interval band per ``predictor``."""
    fig, ax = plt.subplots(figsize=(8, 3.8))
    for i, (name, part) in enumerate(frame.groupby("predictor", sort=False)):
        part = part.sort_values("layer")
        ax.plot(part["layer"], part["recall"] * 100, marker="o", ms=4, color=f"C{i}", label=name)
        ax.fill_between(part["layer"], part["low"] * 100, part["high"] * 100, color=f"C{i}", alpha=0.15, lw=0)
    ax.set_xticks(sorted(frame["layer"].unique()))
    ax.set_xlabel("predicted MoE layer l+1")
    ax.set_ylabel(f"recall@{k} (%)")
    ax.set_ylim(0, 102)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1))
    ax.set_title(title)
    fig.tight_layout()
    return fig


def cache_hit_rates(frame: pd.DataFrame, *, n_experts: int,
                    title: str = "Expert cache: LRU alone and LRU with prefetching") -> Figure:
    """Hit rate (left) and expert loads per token and layer (right) against the cache size, one
    line per ``strategy`` (rows of :func:`moe_utils.prediction.expert_cache.compare`): the first strategy, the
    baseline, dashed black; the others in the colours of :func:`recall_by_layer`, in the same order."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    for i, (name, part) in enumerate(frame.groupby("strategy", sort=False)):
        part = part.sort_values("cache_size")
        style = {"color": f"C{i - 1}" if i else "k", "marker": "o", "ms": 3, "label": name, "ls": "-" if i else "--"}
        axes[0].plot(part["cache_size"], part["hit_rate"] * 100, **style)
        axes[1].plot(part["cache_size"], part["loads_per_token"], **style)
    axes[0].set_ylabel("hit rate (%)")
    axes[0].set_ylim(0, 102)
    axes[1].set_ylabel("expert loads per token and layer")
    axes[1].set_ylim(bottom=0)
    for ax in axes:
        ax.set_xlabel(f"cache size (experts per layer, of {n_experts})")
    axes[1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1))
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def reference_distribution(scores: pd.DataFrame, labels: dict[str, str], distributions: list[str], *,
                           title: str = "Every method among random masks") -> Figure:
    """The random-mask reference distributions of stage 4 with every method as a mark on them: one
    panel per measure (rows) and ratio (columns); in each, one row of dots per distribution (grey:
    uniform per layer; orange: a method's own per-layer allocation), its mean as a bar, and one
    coloured marker per method, over a band of the uniform masks' range. ``scores``: :func:`moe_utils.compression.reference.mask_scores`
    (without the unpruned model); ``labels``: measure -> axis label (with its direction);
    ``distributions``: the names of the reference distributions, the uniform one first."""
    uniform = distributions[0]
    measures = list(dict.fromkeys(scores["measure"]))
    ratios = sorted(scores["ratio"].unique())
    fig, axes = plt.subplots(len(measures), len(ratios), figsize=(3.6 * len(ratios), 0.8 + 3.0 * len(measures)),
                             squeeze=False)
    methods = [m for m in dict.fromkeys(scores["method"]) if m not in distributions]
    colours = {m: f"C{i % 10}" for i, m in enumerate(methods)}
    for row, measure in enumerate(measures):
        for col, ratio in enumerate(ratios):
            ax = axes[row, col]
            part = scores[(scores["measure"] == measure) & np.isclose(scores["ratio"], ratio)]
            names = [d for d in distributions if d in set(part["method"])]
            names += [m for m in methods if m in set(part["method"])]
            for y, name in enumerate(names):
                values = part.loc[part["method"] == name, "value"].to_numpy()
                if name in distributions:
                    jitter = np.random.default_rng(y).uniform(-0.15, 0.15, len(values))
                    colour = "grey" if name == uniform else "tab:orange"
                    ax.scatter(values, y + jitter, s=10, color=colour, alpha=0.7, lw=0)
                    if len(values):
                        ax.plot([values.mean()] * 2, [y - 0.3, y + 0.3], color=colour, lw=2)
                    if name == uniform and len(values):  # the uniform masks' range behind every row
                        ax.axvspan(values.min(), values.max(), color="grey", alpha=0.08, lw=0)
                        ax.axvline(values.mean(), color="grey", ls=":", lw=0.8)
                else:
                    ax.scatter(values, [y] * len(values), marker="D", s=28, color=colours[name], zorder=3)
            ax.set_yticks(range(len(names)), [f"{n} ({(part['method'] == n).sum()} masks)" if n in distributions
                                              else n for n in names], fontsize=7)
            ax.invert_yaxis()
            ax.tick_params(axis="x", labelsize=7)
            ax.set_title(f"{ratio:.0%} pruned", fontsize=8)
            ax.set_xlabel(labels.get(measure, measure), fontsize=8)
    fig.suptitle(title)
    return fig
