"""The control figures draw what they are given (moe_utils.patterns.null_plots)."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import numpy as np
import pandas as pd

from moe_utils.patterns import null_plots


def test_lift_heatmaps_one_panel_per_form_on_one_scale():
    lift = np.full((8, 8), np.nan)
    lift[:4, 4:] = 2.0
    lift[4:, :4] = 0.5
    fig = null_plots.lift_heatmaps({"plain": lift, "given the token": np.ones((8, 8))}, 4)
    images = [ax.images[0] for ax in fig.axes if ax.images]
    assert len(images) == 2
    assert images[0].get_clim() == images[1].get_clim() == (-1.0, 1.0)  # log2 of 2 and 0.5


def test_coverage_and_stability_figures():
    observed = pd.DataFrame({"order": [2, 2, 3, 3], "top_percent": [10, 100] * 2, "coverage": [0.5, 1, 0.4, 1]})
    chance = pd.DataFrame({"order": [2, 2, 3, 3], "top_percent": [10, 100] * 2, "mean": [0.1, 1, 0.05, 1],
                           "low": [0.05, 1, 0, 1], "high": [0.2, 1, 0.1, 1]})
    fig = null_plots.coverage_with_chance(observed, {"uniform": chance})
    assert len([ax for ax in fig.axes if ax.lines]) == 2
    fig = null_plots.atom_stability({"seed": np.array([1.0, 1.0, 0.5, 0.0])})
    line = fig.axes[0].lines[0]
    x, y = line.get_data()
    assert y[0] == 100 and y[np.searchsorted(x, 0.5)] == 75 and y[-1] == 50
