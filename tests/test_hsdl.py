"""HSDL against independent truth: a planted dictionary, scikit-learn on the same matrix, and its own
invariants (hierarchy consistency, decreasing loss, determinism, clear errors for bad input)."""

from __future__ import annotations

import json

import tracemalloc
import warnings

import numpy as np
import pytest
import scipy.sparse as sp
import torch
from scipy.optimize import linear_sum_assignment

from moe_utils.patterns.hsdl import HSDL, _Columns as _columns

LAYOUT = (4, 8)  # 4 MoE layers x 8 experts: N_e = 32
FAST = dict(n_steps=1000, batch_size=256)


def planted(n_atoms: int = 12, n_cols: int = 2000, noise: float = 0.02, seed: int = 0,
            column_seed: int | None = None):
    """X = D R + sparse positive noise, with D binary cross-layer groups (one expert in each of 2-3
    layers) and R sparse (1-2 atoms per column, values in [0.5, 1.5]). D depends on ``seed`` only;
    ``column_seed`` draws other columns from the same dictionary."""
    rng = np.random.default_rng(seed)
    n_layers, n_experts = LAYOUT
    d = np.zeros((n_layers * n_experts, n_atoms), np.float32)
    for j in range(n_atoms):
        for layer in rng.choice(n_layers, size=rng.integers(2, 4), replace=False):
            d[layer * n_experts + rng.integers(n_experts), j] = 1.0
    if column_seed is not None:
        rng = np.random.default_rng(column_seed)
    r = np.zeros((n_atoms, n_cols), np.float32)
    for i in range(n_cols):
        k = rng.integers(1, 3)
        r[rng.choice(n_atoms, k, replace=False), i] = rng.uniform(0.5, 1.5, k)
    x = d @ r + (rng.random((d.shape[0], n_cols)) < noise) * rng.uniform(0, 0.5, (d.shape[0], n_cols))
    return x.astype(np.float32), d, r


def matched_cosines(truth: np.ndarray, fitted: np.ndarray) -> np.ndarray:
    """Cosine of each true atom with its fitted partner under the best one-to-one matching."""
    a = truth / np.maximum(np.linalg.norm(truth, axis=0), 1e-12)
    b = fitted / np.maximum(np.linalg.norm(fitted, axis=0), 1e-12)
    cos = a.T @ b
    rows, cols = linear_sum_assignment(-cos)
    return cos[rows, cols]


def l1_error(x: np.ndarray, reconstruction: np.ndarray) -> float:
    return float(np.abs(x - reconstruction).sum() / np.abs(x).sum())


@pytest.fixture(scope="module")
def data():
    return planted()


@pytest.fixture(scope="module")
def fitted(data):
    x, _, _ = data
    return HSDL(levels=[12], layout=LAYOUT, random_state=0, **FAST).fit(sp.csr_matrix(x))


# ----------------------------------------------------------------------------- planted truth
def test_recovers_planted_cross_layer_atoms(data, fitted):
    x, d, r = data
    cosines = matched_cosines(d, fitted.dictionaries_[0])
    assert cosines.min() > 0.95, np.round(np.sort(cosines), 3)
    noise_floor = l1_error(x, d @ r)
    assert fitted.score(x) < 1.5 * noise_floor
    # the codes are sparse like the planted ones (1.5 atoms per column)
    assert (fitted.codes_[0] != 0).sum(axis=0).mean() < 3


def test_attributes_shapes_and_bounds(data, fitted):
    x, _, _ = data
    assert fitted.level_sizes_ == [12]
    (dictionary,) = fitted.dictionaries_
    assert dictionary.shape == (32, 12) and dictionary.min() >= 0 and dictionary.max() <= 1
    codes = fitted.codes_[0]
    assert sp.issparse(codes) and codes.shape == (12, x.shape[1]) and codes.min() >= 0
    assert set(fitted.loss_history_) == {"step", "total", "level1.sparse", "level1.hier", "level1.rec"}
    assert 0 < fitted.n_steps_ <= FAST["n_steps"]  # may stop early once the loss stops improving
    assert fitted.n_iter_ == np.ceil(fitted.n_steps_ / np.ceil(2000 / 256))
    assert fitted.loss_history_["step"][-1] == fitted.n_steps_
    np.testing.assert_allclose(fitted.inverse_transform(codes), dictionary @ codes.toarray(), rtol=1e-6)


def test_transform_new_columns(data, fitted):
    x_new, d_new, _ = planted(n_cols=300, column_seed=99)  # the same dictionary, columns never seen
    np.testing.assert_array_equal(d_new, data[1])
    codes = fitted.transform(x_new)
    assert isinstance(codes, np.ndarray) and codes.shape == (12, 300) and codes.min() >= 0
    assert sp.issparse(fitted.transform(sp.csr_matrix(x_new)))
    assert fitted.score(x_new) < 0.1
    np.testing.assert_allclose(fitted.transform(torch.from_numpy(x_new)), codes, rtol=1e-5, atol=1e-6)


def test_codes_are_the_encoder_applied_to_every_column(data, fitted):
    """codes_ and transform (summing the encoder's weights over each column's non-zero entries) equal
    relu(W X / s + b) s computed densely, empty columns included."""
    x = data[0].copy()
    x[:, :3] = 0.0
    w, b = fitted.encoder_
    dense = np.maximum(x.T / fitted.x_scale_ @ w.T + b, 0.0).T * fitted.x_scale_
    for given in (x, sp.csr_matrix(x), torch.from_numpy(x)):
        codes = fitted.transform(given)
        np.testing.assert_allclose(codes.toarray() if sp.issparse(codes) else codes, dense, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(fitted.codes_[0].toarray(), np.maximum(data[0].T / fitted.x_scale_ @ w.T + b, 0).T
                               * fitted.x_scale_, rtol=1e-5, atol=1e-5)


def test_loss_decreases(fitted):
    history = fitted.loss_history_
    first, last = np.mean(history["total"][:5]), np.mean(history["total"][-5:])
    assert last < 0.5 * first
    assert np.mean(history["level1.rec"][-5:]) < 0.25 * np.mean(history["level1.rec"][:5])
    # after the smoothing phase the paper's objective keeps falling or flattens, never climbs back
    tail = np.asarray(history["total"][len(history["total"]) // 2:])
    assert tail[-10:].mean() <= tail[:10].mean() * 1.01


# ----------------------------------------------------------------------------- scikit-learn
def test_against_scikit_learn_nmf_and_dictionary_learning(data, fitted):
    from sklearn.decomposition import NMF, MiniBatchDictionaryLearning

    x, d, _ = data
    nmf = NMF(12, init="nndsvda", max_iter=500, random_state=0)
    w = nmf.fit_transform(x.T)  # scikit-learn is samples x features: X.T ~ W H
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # lasso_cd's convergence chatter
        mbdl = MiniBatchDictionaryLearning(12, alpha=0.1, positive_code=True, positive_dict=True, batch_size=256,
                                           max_iter=20, fit_algorithm="cd", transform_algorithm="lasso_cd",
                                           transform_alpha=0.1, random_state=0)
        c = mbdl.fit_transform(x.T)
    nmf_error, mbdl_error = l1_error(x, (w @ nmf.components_).T), l1_error(x, (c @ mbdl.components_).T)
    hsdl_codes = fitted.codes_[0].toarray()
    # same atoms as both (they recover the planted dictionary too) ...
    assert matched_cosines(nmf.components_.T, fitted.dictionaries_[0]).min() > 0.95
    assert matched_cosines(mbdl.components_.T, fitted.dictionaries_[0]).min() > 0.95
    # ... with an L1 reconstruction at least as good and codes at least as sparse as NMF's
    assert fitted.score(x) <= nmf_error * 1.05 and fitted.score(x) <= mbdl_error * 1.05
    assert (hsdl_codes > 0).sum(0).mean() <= (w > 0).sum(1).mean()


# ----------------------------------------------------------------------------- hierarchy
def test_hierarchy_is_consistent():
    x, _, _ = planted(seed=1)
    model = HSDL(levels=[12, 18], layout=LAYOUT, random_state=0, **FAST).fit(x)
    d1, d2 = model.dictionaries_
    r2 = model.codes_[1]
    assert d2.shape == (32, 18) and r2.shape == (18, 12) and r2.min() >= 0 and 0 <= d2.min() and d2.max() <= 1
    assert {"level2.sparse", "level2.hier", "level2.rec"} <= set(model.loss_history_)
    error = np.abs(d1 - d2 @ r2).sum() / np.abs(d1).sum()
    assert model.hierarchy_error() == [pytest.approx(error, rel=1e-5)]
    # D_1 ~ D_2 R_2 where level 1 is used (atoms that code nothing need not be refined)
    used = np.asarray(model.codes_[0].sum(axis=1)).ravel() > 0
    assert np.abs(d1 - d2 @ r2)[:, used].sum() / d1[:, used].sum() < 0.1


def test_deeper_levels_are_mini_batched_over_atoms_without_bias():
    """Level 2's terms on a draw of level 1's atoms, scaled by p_1 over the draw's size: all the atoms
    give the whole sums, and the estimates on the blocks of a partition average to them exactly."""
    x, _, _ = planted(seed=1)
    model = HSDL(levels=[12, 18], layout=LAYOUT, random_state=0, n_steps=20, batch_size=256)
    params = model._init_params(_columns(x), [12, 18], 1.0, torch.Generator().manual_seed(0),
                                np.random.default_rng(0), torch.device("cpu"))
    xb = torch.from_numpy(x[:, :256].T.copy())
    with torch.no_grad():
        whole = model._terms(params, xb)[0][1]
        assert model._terms(params, xb, 0.0, [torch.arange(12)])[0][1] == whole
        blocks = [model._terms(params, xb, 0.5, [block])[0][1] for block in torch.randperm(12).reshape(3, 4)]
        smoothed = model._terms(params, xb, 0.5)[0][1]
    for name in ("hier", "rec", "fit"):
        assert float(sum(b[name] for b in blocks) / 3) == pytest.approx(float(smoothed[name]), rel=1e-5)
    assert all(float(b["sparse"]) == float(whole["sparse"]) for b in blocks)  # the row maxima: always whole


def test_a_hierarchy_is_learned_when_level_2_is_mini_batched():
    x, _, _ = planted(seed=1)
    # batch_size 10 < 12 level-1 atoms: each step evaluates level 2 on 10 of them
    model = HSDL(levels=[12, 18], layout=LAYOUT, random_state=0, n_steps=1000, batch_size=10).fit(x)
    d1, d2 = model.dictionaries_
    used = np.asarray(model.codes_[0].sum(axis=1)).ravel() > 0
    assert np.abs(d1 - d2 @ model.codes_[1])[:, used].sum() / d1[:, used].sum() < 0.15


# ----------------------------------------------------------------------------- determinism, devices
def test_deterministic_for_a_seed_and_same_for_every_input_type(data):
    x, _, _ = data
    kwargs = dict(levels=[12, 16], random_state=3, n_steps=150, batch_size=256)
    a = HSDL(**kwargs).fit(sp.csr_matrix(x))
    b = HSDL(**kwargs).fit(x)
    c = HSDL(**kwargs).fit(torch.from_numpy(x))
    for other in (b, c):
        for left, right in zip(a.dictionaries_, other.dictionaries_):
            np.testing.assert_array_equal(left, right)
        np.testing.assert_array_equal(a.codes_[1], other.codes_[1])
        assert (a.codes_[0] != other.codes_[0]).nnz == 0
        assert a.loss_history_ == other.loss_history_
    d = HSDL(**{**kwargs, "random_state": 4}).fit(x)
    assert not np.array_equal(a.dictionaries_[0], d.dictionaries_[0])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_runs_on_cuda(data):
    x, d, _ = data
    model = HSDL(levels=[12], device="cuda", random_state=0, **FAST).fit(sp.csr_matrix(x))
    assert matched_cosines(d, model.dictionaries_[0]).min() > 0.9
    assert isinstance(model.dictionaries_[0], np.ndarray)


def test_mini_batches_never_densify_all_of_x():
    rng = np.random.default_rng(0)
    n_e, n_cols = 64, 400_000  # dense float32 would be ~100 MB
    rows = rng.integers(0, n_e, size=(n_cols, 4))
    x = sp.csr_matrix((np.ones(rows.size, np.float32), (rows.ravel(), np.repeat(np.arange(n_cols), 4))),
                      shape=(n_e, n_cols))
    x.sum_duplicates()
    tracemalloc.start()
    model = HSDL(levels=[8], n_steps=20, batch_size=2048, random_state=0).fit(x)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert model.codes_[0].shape == (8, n_cols)
    assert peak < 0.5 * n_e * n_cols * 4, f"peak {peak / 1e6:.0f} MB"


# ----------------------------------------------------------------------------- persistence
def test_save_and_load_round_trip(tmp_path, data, fitted):
    x, _, _ = data
    path = fitted.save(tmp_path / "model", extra={"x_spec": {"granularity": "token"}})
    loaded = HSDL.load(path)
    assert loaded.get_params() == fitted.get_params()
    assert loaded.manifest_["x_spec"] == {"granularity": "token"}
    np.testing.assert_array_equal(loaded.transform(x), fitted.transform(x))
    assert (loaded.codes_[0] != fitted.codes_[0]).nnz == 0
    (path / "arrays.npz").write_bytes((path / "arrays.npz").read_bytes() + b"tampered")
    with pytest.raises(ValueError, match="checksum"):
        HSDL.load(path)


@pytest.mark.parametrize("edit, message", [
    (lambda m: json.dumps({**m, "files": {}}), "must list exactly"),
    (lambda m: json.dumps({**m, "files": {"arrays.npz": m["files"]["arrays.npz"]}}), "must list exactly"),
    (lambda m: json.dumps([m]), "holds a list, not an object"),
    (lambda m: "{not json", "is not valid JSON"),
])
def test_an_edited_manifest_is_refused(tmp_path, fitted, edit, message):
    path = fitted.save(tmp_path / "model")
    manifest = json.loads((path / "manifest.json").read_text())
    (path / "manifest.json").write_text(edit(manifest))
    with pytest.raises(ValueError, match=message) as err:
        HSDL.load(path)
    assert str(path) in str(err.value)


# ----------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("make, message", [
    (lambda x: x.T, "X.T"),
    (lambda x: np.where(x > 1.2, np.nan, x), "NaN"),
    (lambda x: x - 0.1, "negative"),
    (lambda x: np.zeros_like(x), "all zeros"),
    (lambda x: x[:, :0], "empty"),
    (lambda x: x[0], "2-D"),
])
def test_bad_input_is_refused_clearly(data, make, message):
    x, _, _ = data
    with pytest.raises(ValueError, match=message):
        HSDL(levels=[4], layout=LAYOUT, n_steps=5).fit(make(x))


@pytest.mark.parametrize("levels, message", [
    ([], "non-empty"), ([0], "positive"), ([4, -2], "positive"), (["4"], "positive"), ([True], "positive"),
    ([5000], "do not fit"), (8, "non-empty"),
])
def test_levels_that_do_not_fit_are_refused(data, levels, message):
    x, _, _ = data
    with pytest.raises(ValueError, match=message):
        HSDL(levels=levels, n_steps=5).fit(x)


def test_float_levels_are_multiples_of_n_e(data):
    x, _, _ = data
    assert HSDL(levels=[0.5, 1.0], n_steps=5).fit(x).level_sizes_ == [16, 32]


def test_transform_checks_fit_and_orientation(data, fitted):
    x, _, _ = data
    with pytest.raises(RuntimeError, match="not fitted"):
        HSDL(levels=[4]).transform(x)
    with pytest.raises(ValueError, match="N_e = 32"):
        fitted.transform(x[:16])


def test_random_initialisation_also_recovers_the_planted_atoms(data, fitted):
    x, d, _ = data
    other = HSDL(levels=[12], layout=LAYOUT, random_state=0, init="random", **FAST).fit(sp.csr_matrix(x))
    assert (matched_cosines(d, other.dictionaries_[0]) > 0.95).sum() >= 10  # most atoms, from random starts
    assert not np.allclose(other.dictionaries_[0], fitted.dictionaries_[0])
    with pytest.raises(ValueError, match="init must be"):
        HSDL(levels=[12], init="kmeans").fit(x)
