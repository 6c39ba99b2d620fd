"""Semantic annotation of HSDL collaboration patterns, and how domains use experts (paper section 5).

The paper labels its patterns by hand (Fig 5) and names that its main limitation. Here every atom
of every HSDL level is annotated from the captured tokens, automatically:

* **Attribution.** The contribution of level-k atom j to token t is the L1 mass of the token's
  routing that the atom reconstructs, ``c_k[j, t] = ||D_k[:, j]||_1 * C_k[j, t]``, with the codes
  of the token at level k ``C_1 = R_1`` and ``C_k = R_k C_{k-1}`` (so
  ``C_2[j, t] = sum_i R_2[j, i] R_1[i, t]``: level 2 explains a token through the level-1 atoms it
  composes). Contributions are in X's units (routing weight), comparable across atoms of different
  sizes. A token is *assigned* to the atom with the largest contribution at each level
  (:func:`attribute_tokens`); all per-atom statistics below count the tokens assigned to it.
* **Per atom** (:func:`annotate_level`): the tokens it explains most often, ranked by
  ``count * log2(lift)`` (their contribution to the divergence of the atom's tokens from the base
  rate), with ``lift = P(token | atom) / P(token)``; its token-class profile
  (:data:`moe_utils.capture.token_text.CLASSES`); and MMLU-Pro category enrichment, a one-sided
  hypergeometric (Fisher exact) test of over-representation per (atom, category), with
  Benjamini-Hochberg (default) or Bonferroni correction over all atoms and categories of the level.
  ``unit="sample"`` repeats the test with questions, not tokens, as the unit (one-sided
  Mann-Whitney U on each question's share of tokens assigned to the atom), since the tokens of a
  question are not independent; ``unit="token_type"`` holds the token id fixed
  (:mod:`moe_utils.patterns.stratified`), since domains differ in their tokens. From these, a short automatic
  label (:func:`auto_label`), whose categories are those enriched with questions as the unit.
* **Hierarchy** (:func:`hierarchy_tree`): each level-k atom with the level-(k+1) atoms composing it
  (edges from :func:`moe_utils.patterns.atoms.hierarchy`), their labels, and whether the child's tokens
  nest in the parent's and its token classes are purer than the parent's.
* **Domains** (:func:`domain_similarity`): cosine similarity of per-category expert-selection
  frequency distributions, the paper's Fig 7.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import scipy.sparse as sp
from scipy import stats

from moe_utils.patterns import atoms as patterns
from moe_utils.patterns.expert_matrix import label_profiles
from moe_utils.capture.store import RoutingStore
from moe_utils.patterns.stratified import cmh_enrichment
from moe_utils.capture.token_text import CLASSES, classify_tokens, detect_scheme, render_prompt
from moe_utils.models.loading import EMBEDDED, EMBEDDED_DIR, RANDOM_PREFIX
from moe_utils.models.tiny_configs import byte_tokenizer

CORRECTIONS = ("bh", "bonferroni")


# -------------------------------------------------------------------------------- attribution
def level_codes(model, columns: slice = slice(None)) -> list[sp.csr_matrix]:
    """Codes of X's columns at every level: ``C_1 = R_1`` (p_1, N_s), ``C_k = R_k C_{k-1}`` (p_k, N_s);
    only the ``columns`` asked for (each column's codes depend on that column alone)."""
    codes = [sp.csr_matrix(sp.csc_matrix(model.codes_[0])[:, columns], dtype=np.float64)]
    for r in model.codes_[1:]:
        codes.append((sp.csr_matrix(np.asarray(r, dtype=np.float64)) @ codes[-1]).tocsr())
    return codes


def level_contributions(model, columns: slice = slice(None)) -> list[sp.csr_matrix]:
    """``c_k[j, t] = ||D_k[:, j]||_1 * C_k[j, t]``: routing mass of token t reconstructed by atom j of level k."""
    return [(sp.diags(np.asarray(d, dtype=np.float64).sum(axis=0)) @ c).tocsr()
            for d, c in zip(model.dictionaries_, level_codes(model, columns))]


def attribute_tokens(model, block: int = 8192) -> pd.DataFrame:
    """Per token (column of X) and level k: ``atom_k`` (largest contribution; -1 if none),
    ``contribution_k`` (its value) and ``share_k`` (its share of all level-k contributions to the token).

    Computed ``block`` tokens at a time: deeper levels' codes fill in (R_k is dense), and all
    tokens' at once would take tens of GB at a large model's shape."""
    parts = []
    for start in range(0, max(1, model.codes_[0].shape[1]), block):  # one empty block for no tokens
        out = {}
        for level, contrib in enumerate(level_contributions(model, slice(start, start + block)), start=1):
            columns = contrib.tocsc()
            best = np.asarray(columns.argmax(axis=0)).ravel()
            top = np.asarray(columns.max(axis=0).toarray()).ravel()
            total = np.asarray(columns.sum(axis=0)).ravel()
            explained = total > 0
            out[f"atom_{level}"] = np.where(explained, best, -1)
            out[f"contribution_{level}"] = top
            out[f"share_{level}"] = np.divide(top, total, out=np.zeros_like(top), where=explained)
        parts.append(pd.DataFrame(out))
    return pd.concat(parts, ignore_index=True)


def tokenizer_for(store: RoutingStore, *, trust_remote_code: bool = False):
    """The tokenizer of the model a store was captured from, without loading the model's weights."""
    model = store.manifest["model"]
    name = str(model["name"])
    if name.startswith(RANDOM_PREFIX):
        return byte_tokenizer()
    from transformers import AutoTokenizer

    if name == EMBEDDED:
        name = str(EMBEDDED_DIR)
    return AutoTokenizer.from_pretrained(name, revision=model.get("revision"), trust_remote_code=trust_remote_code)


def token_table(store: RoutingStore, model, tokenizer=None) -> pd.DataFrame:
    """The store's token table with ``key`` (the token's text without surrounding spaces),
    ``token_class``, ``word_start`` and the attribution of every level (:func:`attribute_tokens`).

    ``model`` must be an HSDL fitted on token columns of this store. ``tokenizer`` supplies the
    raw pieces that carry word-start markers; without it, a leading space in the decoded text does.
    """
    if model.codes_[0].shape[1] != store.n_tokens:
        raise ValueError(f"the HSDL codes have {model.codes_[0].shape[1]} columns but the store has "
                         f"{store.n_tokens} tokens: annotation needs an HSDL fitted on token columns "
                         "(granularity='token') of this store")
    tokens = store.tokens.reset_index(drop=True)
    pieces = scheme = None
    if tokenizer is not None:
        pieces = tokenizer.convert_ids_to_tokens(tokens["token_id"].astype(int).tolist())
        scheme = detect_scheme(tokenizer.get_vocab())
    classes = classify_tokens(tokens["token"].tolist(), pieces=pieces, scheme=scheme,
                              sample_ids=tokens["sample_id"].to_numpy())
    key = tokens["token"].astype(str).str.strip().replace("", "\u2423")  # whitespace tokens as a visible sign
    key = key.where(~tokens["token"].astype(str).str.contains("\n"), "\u23ce")
    return pd.concat([tokens, key.rename("key"), classes, attribute_tokens(model)], axis=1)


# ----------------------------------------------------------------------------- per-atom views
def top_tokens(keys, atoms, *, n: int = 5, min_count: int = 3) -> pd.DataFrame:
    """The tokens each atom is assigned most characteristically: ``count``, ``share`` of the atom's
    tokens, ``lift`` over the token's base rate, and ``score = count * log2(lift)``; the ``n``
    best per atom with ``count >= min_count`` and ``lift > 1``, ties broken by token text."""
    frame = pd.DataFrame({"atom": np.asarray(atoms), "key": np.asarray(keys, dtype=object)})
    frame = frame[frame["atom"] >= 0]
    base = frame["key"].value_counts(normalize=True)
    counts = frame.groupby(["atom", "key"]).size().rename("count").reset_index()
    counts["share"] = counts["count"] / counts.groupby("atom")["count"].transform("sum")
    counts["lift"] = counts["share"] / counts["key"].map(base).to_numpy()
    counts = counts[(counts["count"] >= min_count) & (counts["lift"] > 1)].copy()
    counts["score"] = counts["count"] * np.log2(counts["lift"])
    counts = counts.sort_values(["atom", "score", "key"], ascending=[True, False, True], kind="stable")
    return counts.groupby("atom").head(n).reset_index(drop=True)


def class_profile(classes, atoms, n_atoms: int) -> pd.DataFrame:
    """(n_atoms, classes): share of each atom's assigned tokens in each token class (rows of unused atoms are 0)."""
    frame = pd.crosstab(pd.Series(np.asarray(atoms), name="atom"),
                        pd.Categorical(np.asarray(classes), categories=CLASSES), dropna=False)
    frame = frame.reindex(index=range(n_atoms), columns=list(CLASSES), fill_value=0)
    frame.columns.name = "token_class"
    return frame.div(frame.sum(axis=1).replace(0, 1), axis=0)


def _correct(p: np.ndarray, correction: str) -> np.ndarray:
    if correction == "bh":
        return stats.false_discovery_control(p, method="bh") if p.size else p
    if correction == "bonferroni":
        return np.minimum(1.0, p * p.size)
    raise ValueError(f"correction must be one of {CORRECTIONS}, got {correction!r}")


def enrichment(atoms, labels, n_atoms: int, *, sample_ids=None, strata=None, unit: str = "token",
               correction: str = "bh", alpha: float = 0.01) -> pd.DataFrame:
    """One-sided over-representation of each category among each atom's tokens.

    ``unit="token"``: hypergeometric tail P(overlap >= observed) with N tokens, K of the category and
    n assigned to the atom (Fisher's exact test, alternative "greater"); ``lift`` = observed /
    expected overlap. ``unit="sample"``: for each question the share of its tokens assigned to the
    atom, compared between the category's questions and the others with a one-sided Mann-Whitney U
    test; ``lift`` = mean share in the category / mean share over all questions (needs
    ``sample_ids``). ``unit="token_type"``: the same over tokens, holding the token fixed (a
    Cochran-Mantel-Haenszel test stratified by ``strata``, the token ids:
    :func:`moe_utils.patterns.stratified.cmh_enrichment`); ``lift`` = observed / expected given the tokens.
    Atoms assigned no token are not tested. ``q`` corrects ``p`` over all tests of
    the call (atoms x categories) with ``correction``; ``significant`` is ``q < alpha``.
    """
    atoms = np.asarray(atoms)
    labels = np.asarray(labels, dtype=object)
    if pd.isna(labels).any():
        raise ValueError("some tokens have no label: enrichment needs the category of every token "
                         "(capture with labels=)")
    categories = sorted(pd.unique(labels))
    n_per_atom = np.bincount(atoms[atoms >= 0], minlength=n_atoms)
    tested = np.nonzero(n_per_atom > 0)[0]
    rows = []
    if unit == "token":
        total = len(atoms)
        for category in categories:
            member = labels == category
            overlap = np.bincount(atoms[member & (atoms >= 0)], minlength=n_atoms)[tested]
            k_cat, n_atom = int(member.sum()), n_per_atom[tested]
            expected = n_atom * k_cat / total
            p = stats.hypergeom.sf(overlap - 1, total, k_cat, n_atom)
            rows.append(pd.DataFrame({"atom": tested, "category": category, "n_atom": n_atom, "n_category": k_cat,
                                      "overlap": overlap, "expected": expected, "lift": overlap / expected,
                                      "p": p}))
    elif unit == "sample":
        if sample_ids is None:
            raise ValueError("unit='sample' needs sample_ids")
        samples, column = np.unique(np.asarray(sample_ids), return_inverse=True)
        keep = atoms >= 0
        counts = np.zeros((len(samples), n_atoms))
        np.add.at(counts, (column[keep], atoms[keep]), 1.0)
        shares = (counts / np.bincount(column, minlength=len(samples))[:, None])[:, tested]
        sample_label = pd.Series(labels).groupby(column).first().to_numpy()
        for category in categories:
            member = sample_label == category
            if member.all() or not member.any():
                p = np.ones(len(tested))
            else:
                p = stats.mannwhitneyu(shares[member], shares[~member], alternative="greater", axis=0).pvalue
            mean_all = shares.mean(axis=0)
            rows.append(pd.DataFrame({"atom": tested, "category": category, "n_atom": n_per_atom[tested],
                                      "n_category": int(member.sum()), "lift": np.divide(
                                          shares[member].mean(axis=0), mean_all, out=np.zeros(len(tested)),
                                          where=mean_all > 0), "p": np.nan_to_num(p, nan=1.0)}))
    elif unit == "token_type":
        if strata is None:
            raise ValueError("unit='token_type' needs strata (each token's id)")
        rows.append(cmh_enrichment(atoms, labels, strata, n_atoms))
    else:
        raise ValueError(f"unit must be 'token', 'sample' or 'token_type', got {unit!r}")
    table = pd.concat(rows, ignore_index=True) if rows else pd.DataFrame(columns=["atom", "category", "p"])
    table["q"] = _correct(table["p"].to_numpy(dtype=float), correction)
    table["significant"] = table["q"] < alpha
    return table.sort_values(["atom", "category"], kind="stable").reset_index(drop=True)


def auto_label(top: pd.DataFrame, profile: pd.Series, base: pd.Series, enriched: pd.DataFrame, *,
               n_tokens: int = 3, min_class_lift: float = 1.5, min_class_share: float = 0.2) -> str:
    """A short label: dominant token classes, characteristic tokens, enriched categories.

    Classes: those with share >= ``min_class_share`` and lift >= ``min_class_lift`` over ``base``
    (at most two), else the most frequent class. Tokens: the first ``n_tokens`` of :func:`top_tokens`.
    Categories: the significant rows of ``enriched``, largest lift first, in brackets.
    """
    lift = profile / base.replace(0, np.nan)
    strong = profile[(profile >= min_class_share) & (lift >= min_class_lift)]
    strong = strong.sort_values(ascending=False, kind="stable").head(2)
    classes = list(strong.index) if len(strong) else [profile.idxmax()] if profile.sum() > 0 else []
    parts = ["+".join(classes)] if classes else []
    if len(top):
        parts.append(" ".join(repr(k) for k in top["key"].head(n_tokens)))
    significant = enriched[enriched["significant"]].sort_values(["lift", "category"], ascending=[False, True])
    if len(significant):
        parts.append("[" + ", ".join(significant["category"].head(2)) + "]")
    return " ".join(parts) if parts else "(explains no token)"


@dataclass
class LevelAnnotation:
    """Everything known about the atoms of one HSDL level.

    Attributes:
        level: 1-based HSDL level.
        atoms: one row per atom: the pattern view of :func:`moe_utils.patterns.atoms.atom_table` plus
            ``n_tokens`` assigned, ``token_share``, ``top_class``, ``top_tokens``, ``categories``
            (significant with questions as the unit: the ones the label names), ``min_q`` and
            ``domain_specific`` (tokens as the unit), ``min_q_by_sample`` and
            ``domain_specific_by_sample`` (questions), ``min_q_by_type`` and ``domain_specific_by_type``
            (tokens, holding the token id fixed), and ``label``.
        top_tokens: :func:`top_tokens`. classes: :func:`class_profile`. enrichment: :func:`enrichment`
            with tokens as the unit; enrichment_by_sample: the same with questions as the unit;
            enrichment_by_type: stratified by token id.
    """

    level: int
    atoms: pd.DataFrame
    top_tokens: pd.DataFrame
    classes: pd.DataFrame
    enrichment: pd.DataFrame
    enrichment_by_sample: pd.DataFrame
    enrichment_by_type: pd.DataFrame

    @property
    def labels(self) -> dict[int, str]:
        return dict(zip(self.atoms["atom"].tolist(), self.atoms["label"].tolist()))


def annotate_level(tokens: pd.DataFrame, model, level: int, *, alpha: float = 0.01, correction: str = "bh",
                   n_top: int = 5, min_count: int = 3, threshold: float = 0.5) -> LevelAnnotation:
    """Annotate the atoms of ``level`` from a :func:`token_table` (see the module docstring)."""
    n_atoms = model.dictionaries_[level - 1].shape[1]
    atoms = tokens[f"atom_{level}"].to_numpy()
    top = top_tokens(tokens["key"], atoms, n=n_top, min_count=min_count)
    classes = class_profile(tokens["token_class"], atoms, n_atoms)
    base = tokens["token_class"].value_counts(normalize=True).reindex(list(CLASSES), fill_value=0.0)
    by_token = enrichment(atoms, tokens["label"], n_atoms, unit="token", correction=correction, alpha=alpha)
    by_sample = enrichment(atoms, tokens["label"], n_atoms, sample_ids=tokens["sample_id"], unit="sample",
                           correction=correction, alpha=alpha)
    by_type = enrichment(atoms, tokens["label"], n_atoms, strata=tokens["token_id"], unit="token_type",
                         correction=correction, alpha=alpha)
    table = patterns.atom_table(model, level=level, threshold=threshold)
    n_tokens = np.bincount(atoms[atoms >= 0], minlength=n_atoms)
    table["n_tokens"] = n_tokens
    table["token_share"] = n_tokens / max(1, len(atoms))
    top_by_atom = dict(iter(top.groupby("atom")))
    enrich_by_atom = dict(iter(by_sample.groupby("atom")))  # labels name question-level enrichment
    empty_top, empty_enrich = top.iloc[:0], by_sample.iloc[:0]
    labels, top_class, top_keys, categories = [], [], [], []
    for atom in range(n_atoms):
        atom_top = top_by_atom.get(atom, empty_top)
        atom_enrich = enrich_by_atom.get(atom, empty_enrich)
        profile = classes.loc[atom]
        labels.append(auto_label(atom_top, profile, base, atom_enrich) if n_tokens[atom] else "(explains no token)")
        top_class.append(profile.idxmax() if n_tokens[atom] else "")
        top_keys.append(tuple(atom_top["key"]))
        significant = atom_enrich[atom_enrich["significant"]].sort_values("lift", ascending=False)
        categories.append(tuple(significant["category"]))
    table["top_class"], table["top_tokens"], table["categories"] = top_class, top_keys, categories
    for suffix, tests in (("", by_token), ("_by_sample", by_sample), ("_by_type", by_type)):
        table[f"min_q{suffix}"] = tests.groupby("atom")["q"].min().reindex(range(n_atoms), fill_value=1.0).to_numpy()
        table[f"domain_specific{suffix}"] = table[f"min_q{suffix}"] < alpha
    table["label"] = labels
    return LevelAnnotation(level, table, top, classes, by_token, by_sample, by_type)


@dataclass
class Annotation:
    """The annotation of every HSDL level: ``tokens`` (:func:`token_table`) and ``levels``
    (:class:`LevelAnnotation`, level 1 first)."""

    tokens: pd.DataFrame
    levels: list[LevelAnnotation]

    def level(self, level: int) -> LevelAnnotation:
        return self.levels[level - 1]

    def render(self, sample_id, *, levels=None, max_colours: int = 10, max_tokens: int | None = None,
               caption: str | None = None) -> str:
        """HTML of one prompt coloured by its atoms at each level (:func:`moe_utils.capture.token_text.render_prompt`)."""
        prompt = self.tokens[self.tokens["sample_id"] == sample_id].sort_values("position", kind="stable")
        if prompt.empty:
            raise ValueError(f"no tokens with sample_id {sample_id!r} in the store")
        prompt = prompt.head(max_tokens) if max_tokens else prompt
        levels = levels or range(1, len(self.levels) + 1)
        rows = [(f"level {k}", prompt[f"atom_{k}"].to_numpy(), self.level(k).labels) for k in levels]
        return render_prompt(prompt["token"].astype(str).tolist(), rows, max_colours=max_colours, caption=caption)


def annotate(store: RoutingStore, model, tokenizer=None, **kwargs) -> Annotation:
    """Annotate every level of ``model`` (an HSDL fitted on this store's token columns); ``kwargs``
    go to :func:`annotate_level`."""
    tokens = token_table(store, model, tokenizer)
    return Annotation(tokens, [annotate_level(tokens, model, k, **kwargs)
                               for k in range(1, len(model.dictionaries_) + 1)])


# ---------------------------------------------------------------------------------- hierarchy
def _entropy(profile: pd.DataFrame) -> np.ndarray:
    p = profile.to_numpy(dtype=float)
    with np.errstate(divide="ignore", invalid="ignore"):
        return -np.nansum(np.where(p > 0, p * np.log2(p), 0.0), axis=1)


def hierarchy_tree(annotation: Annotation, model, level: int = 1, min_share: float = 0.1) -> pd.DataFrame:
    """Each level-``level`` atom (parent) with the level-(``level`` + 1) atoms that compose it
    (:func:`moe_utils.patterns.atoms.hierarchy`), their labels, and whether the child refines the parent:

    * ``overlap``: tokens assigned to the parent at level ``level`` and to the child one level
      down; ``taken``: their share of the parent's tokens (a parent split by its children has
      several children with a large ``taken``);
    * ``nesting``: share of the child's tokens whose level-``level`` atom is the parent;
      ``nesting_lift`` divides it by the parent's share of all tokens (1 = no relation);
    * ``parent_entropy``, ``child_entropy``: entropy (bits) of their token-class profiles; a
      child that refines its parent has a lower one;
    * ``same_top_class``: the child's most frequent class is the parent's.
    """
    edges = patterns.hierarchy(model, level=level, min_share=min_share)
    parent, child = annotation.level(level), annotation.level(level + 1)
    tokens = annotation.tokens
    joint = pd.crosstab(tokens[f"atom_{level + 1}"], tokens[f"atom_{level}"])
    child_total = tokens[f"atom_{level + 1}"].value_counts()
    parent_total = tokens[f"atom_{level}"].value_counts()
    parent_share = parent_total / len(tokens)
    pairs = list(zip(edges["child"], edges["parent"]))
    overlap = np.array([joint.at[c, p] if c in joint.index and p in joint.columns else 0 for c, p in pairs])
    n_child = child_total.reindex(edges["child"], fill_value=0).to_numpy()
    edges["parent_label"] = edges["parent"].map(parent.labels)
    edges["child_label"] = edges["child"].map(child.labels)
    n_parent = parent_total.reindex(edges["parent"], fill_value=0).to_numpy()
    edges["parent_tokens"], edges["child_tokens"], edges["overlap"] = n_parent, n_child, overlap
    edges["taken"] = np.divide(overlap, n_parent, out=np.full(len(edges), np.nan), where=n_parent > 0)
    edges["nesting"] = np.divide(overlap, n_child, out=np.full(len(edges), np.nan), where=n_child > 0)
    edges["nesting_lift"] = edges["nesting"] / parent_share.reindex(edges["parent"], fill_value=np.nan).to_numpy()
    entropy_parent, entropy_child = _entropy(parent.classes), _entropy(child.classes)
    edges["parent_entropy"] = entropy_parent[edges["parent"].to_numpy()]
    edges["child_entropy"] = np.where(n_child > 0, entropy_child[edges["child"].to_numpy()], np.nan)
    top_parent = parent.atoms.set_index("atom")["top_class"]
    top_child = child.atoms.set_index("atom")["top_class"]
    edges["same_top_class"] = (top_parent.reindex(edges["parent"]).to_numpy()
                               == top_child.reindex(edges["child"]).to_numpy()) & (n_child > 0)
    return edges


# ------------------------------------------------------------------------------------ domains
def domain_profiles(store: RoutingStore) -> pd.DataFrame:
    """(categories, N_e): each category's expert-selection frequency distribution (rows sum to 1),
    from :func:`moe_utils.patterns.expert_matrix.label_profiles`; categories sorted by name."""
    profiles = label_profiles(store).sort_index().astype(np.float64)
    return profiles.div(profiles.sum(axis=1), axis=0)


def domain_similarity(profiles: pd.DataFrame, *, centered: bool = False) -> pd.DataFrame:
    """Pairwise cosine similarity of the rows of ``profiles`` (the paper's Fig 7).

    All domains share most of their routing, so raw cosines sit close to 1; with ``centered`` the
    mean profile over the categories is removed first, leaving what sets each domain apart.
    """
    values = profiles.to_numpy(dtype=float)
    if centered:
        values = values - values.mean(axis=0, keepdims=True)
    norms = np.linalg.norm(values, axis=1, keepdims=True)
    unit = np.divide(values, norms, out=np.zeros_like(values), where=norms > 0)
    return pd.DataFrame(unit @ unit.T, index=profiles.index, columns=profiles.index)


def ranked_pairs(similarity: pd.DataFrame) -> pd.DataFrame:
    """Distinct pairs of a similarity matrix, most similar first (ties broken by name)."""
    names = list(similarity.index)
    rows = [{"a": names[i], "b": names[j], "cosine": float(similarity.iat[i, j])}
            for i in range(len(names)) for j in range(i + 1, len(names))]
    frame = pd.DataFrame(rows, columns=["a", "b", "cosine"])
    return frame.sort_values(["cosine", "a", "b"], ascending=[False, True, True], kind="stable").reset_index(drop=True)
