"""Domain enrichment of atoms holding the token fixed: a Cochran-Mantel-Haenszel test per (atom, category).

In a small vocabulary a token's identity largely fixes its experts, and domains differ in their
tokens (math questions hold digits and operators, law questions legal words). An atom can then look
specific to a domain only because the domain's tokens route to it. Stratifying by token id asks
whether, *among occurrences of the same token*, those in the category's questions are assigned to
the atom more often than the others (the paper's section 5 reads its patterns as semantic; this is
the control for the token itself, Tang et al. 2025 do not report one).

For atom a, category c and each token type v (a stratum) the 2 x 2 table counts the occurrences of
v by (assigned to a or not) x (in c or not). With ``n_v`` occurrences, ``n_va`` assigned to the atom,
``n_vc`` in the category and ``x_v`` both, the Mantel-Haenszel statistic is

    Z = (sum_v x_v - sum_v E_v - 1/2) / sqrt(sum_v V_v),
    E_v = n_va n_vc / n_v,  V_v = n_va (n_v - n_va) n_vc (n_v - n_vc) / (n_v^2 (n_v - 1)),

with the continuity correction of 1/2, and the one-sided p-value is ``P(N(0, 1) >= Z)``. Token types
seen once, or only in one category, or always or never assigned to the atom, carry no information
(``V_v = 0``). The token-adjusted ``lift`` is ``sum x_v / sum E_v``: 1 when the category's share of
the atom's tokens is what its tokens predict.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from scipy import stats


def cmh_enrichment(atoms, labels, strata, n_atoms: int) -> pd.DataFrame:
    """One row per (atom assigned at least one token, category): ``observed`` (the atom's tokens in
    the category), ``expected`` (sum of E_v), ``variance`` (sum of V_v), token-adjusted ``lift`` and
    the one-sided Mantel-Haenszel ``p`` (see the module docstring); ``atoms`` holds each token's atom
    (-1: none, counted as "not assigned"), ``labels`` its category, ``strata`` its token id."""
    atoms, labels, strata = np.asarray(atoms), np.asarray(labels, dtype=object), np.asarray(strata)
    if not len(atoms) == len(labels) == len(strata):
        raise ValueError(f"atoms ({len(atoms)}), labels ({len(labels)}) and strata ({len(strata)}) must have "
                         "one entry per token")
    if pd.isna(labels).any():
        raise ValueError("some tokens have no label: enrichment needs the category of every token")
    categories, category = np.unique(labels, return_inverse=True)
    _, stratum = np.unique(strata, return_inverse=True)
    n_strata, n_cat = int(stratum.max(initial=-1)) + 1, len(categories)
    tested = np.nonzero(np.bincount(atoms[atoms >= 0], minlength=n_atoms))[0]
    column = np.full(n_atoms, -1)
    column[tested] = np.arange(len(tested))
    keep = atoms >= 0
    n_v = np.bincount(stratum, minlength=n_strata).astype(float)
    n_vc = np.zeros((n_strata, n_cat))
    np.add.at(n_vc, (stratum, category), 1.0)
    n_va = np.zeros((n_strata, len(tested)))
    np.add.at(n_va, (stratum[keep], column[atoms[keep]]), 1.0)
    x_vac = np.zeros((n_strata, len(tested), n_cat))
    np.add.at(x_vac, (stratum[keep], column[atoms[keep]], category[keep]), 1.0)
    informative = n_v > 1
    expected = np.einsum("va,vc->ac", n_va / np.maximum(n_v, 1)[:, None], n_vc)
    weight = np.where(informative, 1.0 / np.maximum(n_v ** 2 * (n_v - 1), 1), 0.0)
    variance = np.einsum("va,vc->ac", n_va * (n_v[:, None] - n_va) * weight[:, None], n_vc * (n_v[:, None] - n_vc))
    observed = x_vac.sum(axis=0)
    with np.errstate(divide="ignore", invalid="ignore"):
        z = (observed - expected - 0.5) / np.sqrt(variance)
        lift = np.where(expected > 0, observed / expected, np.nan)
    p = np.where(variance > 0, stats.norm.sf(z), 1.0)
    a_index, c_index = np.meshgrid(np.arange(len(tested)), np.arange(n_cat), indexing="ij")
    return pd.DataFrame({"atom": tested[a_index.ravel()], "category": categories[c_index.ravel()],
                         "observed": observed.ravel(), "expected": expected.ravel(), "variance": variance.ravel(),
                         "lift": lift.ravel(), "p": p.ravel()})
