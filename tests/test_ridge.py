"""RidgeCV: exact ridge solutions, per-target alpha by grouped CV, batching, and clear errors."""

import numpy as np
import pytest
import torch
from sklearn.linear_model import Ridge
from sklearn.linear_model import RidgeCV as SklearnRidgeCV

from brainldm.decoding import ridge as ridge_module
from brainldm.decoding.ridge import RidgeCV, make_folds
from brainldm.validation import InputError


def _problem(n=240, p=30, t=6, seed=0, noise=1.0):
    rng = np.random.default_rng(seed)
    X = (rng.standard_normal((n, p)) * 2 + 0.5).astype(np.float32)
    W = rng.standard_normal((p, t)).astype(np.float32)
    Y = (X @ W + noise * rng.standard_normal((n, t)) * 6 + 3).astype(np.float32)
    return X, Y


@pytest.mark.parametrize("n, p", [(200, 40), (40, 120)])  # primal (n >= p) and dual (n < p) forms
@pytest.mark.parametrize("alpha", [0.5, 50.0, 5000.0])
def test_matches_sklearn_ridge_with_intercept_at_a_fixed_alpha(n, p, alpha):
    X, Y = _problem(n, p)
    ours = RidgeCV(alphas=[alpha], cv=2, device="cpu").fit(X, Y)
    theirs = Ridge(alpha=alpha, fit_intercept=True).fit(X.astype(np.float64), Y.astype(np.float64))
    X_new = np.random.default_rng(1).standard_normal((25, p)).astype(np.float32)
    expected = theirs.predict(X_new.astype(np.float64))
    assert np.abs(ours.predict(X_new) - expected).max() <= 1e-4 * np.abs(expected).max()


def test_cv_scores_equal_brute_force_refits_per_fold():
    X, Y = _problem(n=150, p=12, t=4, noise=3.0)
    alphas = [0.1, 10.0, 1000.0]
    groups = np.repeat(np.arange(50), 3)
    model = RidgeCV(alphas=alphas, cv=3, device="cpu", dtype="float64").fit(X, Y, groups=groups)
    folds = make_folds(len(X), 3, groups, seed=0)
    expected = np.zeros((len(alphas), Y.shape[1]))
    for validation in folds:
        train = np.setdiff1d(np.arange(len(X)), validation)
        for a, alpha in enumerate(alphas):
            pred = Ridge(alpha=alpha).fit(X[train], Y[train]).predict(X[validation])
            for t in range(Y.shape[1]):
                expected[a, t] += np.corrcoef(pred[:, t], Y[validation, t])[0, 1] / len(folds)
    np.testing.assert_allclose(model.cv_scores_.numpy(), expected, atol=1e-6)
    np.testing.assert_array_equal(model.best_alphas_.numpy(), np.asarray(alphas)[expected.argmax(0)])


@pytest.mark.parametrize("n_images, p", [(60, 12), (30, 80)])  # primal and dual forms on the distinct rows
@pytest.mark.parametrize("scoring", ["correlation", "mse"])
def test_distinct_rows_fit_as_the_expanded_samples_do(n_images, p, scoring):
    """Repeated presentations: X's distinct rows plus the row of each sample give the expanded X's fit exactly,
    also when some images have fewer presentations than others and a row's samples straddle folds."""
    rng = np.random.default_rng(3)
    images = rng.standard_normal((n_images, p)) * 2 + 0.5
    rows = np.concatenate([np.repeat(np.arange(n_images), 3), np.arange(n_images // 2)])  # some shown 4 times
    Y = images[rows] @ rng.standard_normal((p, 5)) + 4 * rng.standard_normal((len(rows), 5)) + 3
    for groups in (rows, None):  # grouped folds, and plain ones that split an image's samples
        kwargs = dict(alphas=[0.1, 10.0, 1000.0], cv=3, scoring=scoring, device="cpu", dtype="float64")
        expanded = RidgeCV(**kwargs).fit(images[rows], Y, groups=groups)
        distinct = RidgeCV(**kwargs).fit(images, Y, groups=groups, rows=rows)
        torch.testing.assert_close(distinct.cv_scores_, expanded.cv_scores_, rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(distinct.coef_, expanded.coef_, rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(distinct.intercept_, expanded.intercept_, rtol=1e-9, atol=1e-9)
    with pytest.raises(InputError, match="rows must hold one index into X's"):
        RidgeCV(cv=3, device="cpu").fit(images, Y, rows=rows[:-1])


def test_alpha_is_chosen_per_target():
    rng = np.random.default_rng(0)
    X = rng.standard_normal((300, 20)).astype(np.float32)
    clean = X @ rng.standard_normal(20).astype(np.float32)  # no noise: wants the smallest penalty
    noise = rng.standard_normal(300).astype(np.float32)  # nothing to learn: wants the largest
    model = RidgeCV(alphas=[1e-2, 1e1, 1e6], cv=5, scoring="mse", device="cpu").fit(X, np.stack([clean, noise], 1))
    assert model.best_alphas_.tolist() == pytest.approx([1e-2, 1e6])


def test_groups_never_straddle_folds():
    groups = np.repeat(np.arange(40), 3)[np.random.default_rng(0).permutation(120)]
    folds = make_folds(120, 5, groups)
    assert sorted(np.concatenate(folds).tolist()) == list(range(120))
    for k, fold in enumerate(folds):
        others = np.concatenate([f for j, f in enumerate(folds) if j != k])
        assert not set(groups[fold]) & set(groups[others])


def test_target_batches_do_not_change_the_result():
    X, Y = _problem(t=10, noise=2.0)
    one = RidgeCV(alphas=[1.0, 100.0, 1e4], device="cpu").fit(X, Y)
    batched = RidgeCV(alphas=[1.0, 100.0, 1e4], device="cpu", target_batch_size=3).fit(X, Y)
    torch.testing.assert_close(one.coef_, batched.coef_)
    torch.testing.assert_close(one.cv_scores_, batched.cv_scores_)


def test_held_out_correlation_at_least_sklearn_ridgecv():
    rng = np.random.default_rng(3)
    latent = rng.standard_normal((300, 10)).astype(np.float32)
    mixing = rng.standard_normal((10, 80)).astype(np.float32)
    readout = rng.standard_normal((10, 40)).astype(np.float32)
    images = np.repeat(np.arange(200), 3)
    X = latent[images] @ mixing + 3 * rng.standard_normal((600, 80)).astype(np.float32)
    Y = latent[images] @ readout + 2 * rng.standard_normal((600, 40)).astype(np.float32)
    X_test, Y_test = (
        latent[200:] @ mixing + 3 * rng.standard_normal((100, 80)).astype(np.float32),
        latent[200:] @ readout,
    )
    alphas = np.logspace(-1, 5, 8)
    ours = RidgeCV(alphas=alphas, device="cpu").fit(X, Y, groups=images).predict(X_test)
    theirs = SklearnRidgeCV(alphas=alphas, alpha_per_target=True).fit(X, Y).predict(X_test)

    def mean_r(pred):
        return np.mean([np.corrcoef(pred[:, t], Y_test[:, t])[0, 1] for t in range(Y.shape[1])])

    assert mean_r(ours) >= mean_r(theirs)


@pytest.mark.parametrize("alphas", [[0.0, 1.0], [-1.0], []])
def test_non_positive_alphas_are_rejected(alphas):
    X, Y = _problem()
    with pytest.raises(InputError, match="alphas must all be > 0"):
        RidgeCV(alphas=alphas, device="cpu").fit(X, Y)


@pytest.mark.parametrize("where", ["X", "Y"])
def test_nan_input_is_rejected(where):
    X, Y = _problem()
    (X if where == "X" else Y)[3, 2] = np.nan
    with pytest.raises(InputError, match=f"{where} contains 1 NaN"):
        RidgeCV(device="cpu").fit(X, Y)


def test_predict_before_fit_and_wrong_width_are_errors():
    X, Y = _problem()
    from sklearn.exceptions import NotFittedError

    with pytest.raises(NotFittedError, match="not fitted"):  # a caller's bug, as scikit-learn's contract names it
        RidgeCV().predict(X)
    model = RidgeCV(alphas=[1.0], device="cpu").fit(X, Y)
    with pytest.raises(InputError, match="X has 29 features, but RidgeCV is expecting 30 features as input"):
        model.predict(X[:, 1:])


def test_ridgecv_follows_the_scikit_learn_estimator_contract():
    from sklearn.base import clone

    rng = np.random.default_rng(0)
    X, Y = rng.standard_normal((60, 5)), rng.standard_normal((60, 3))
    ridge = RidgeCV(alphas=(1.0, 10.0), cv=3, device="cpu")
    assert (
        ridge.get_params()["alphas"] == (1.0, 10.0) and repr(ridge) == "RidgeCV(alphas=(1.0, 10.0), cv=3, device='cpu')"
    )
    twin = clone(ridge).set_params(cv=4)
    assert twin.get_params()["cv"] == 4 and ridge.cv == 3 and not hasattr(twin, "coef_")
    assert not twin.__sklearn_is_fitted__()  # scikit-learn's fitted-ness protocol
    ridge.fit(X, Y)
    assert ridge.__sklearn_is_fitted__()
    assert ridge.n_features_in_ == 5 and not hasattr(clone(ridge), "coef_")  # a clone is unfitted
    with pytest.raises(InputError, match="no parameter 'alpha'"):
        ridge.set_params(alpha=3.0)


def test_fitting_on_the_cpu_leaves_the_process_wide_tf32_flag_alone(monkeypatch):
    seen = []
    real = ridge_module.ridge_cv_scores
    monkeypatch.setattr(
        ridge_module,
        "ridge_cv_scores",
        lambda *a, **k: seen.append(torch.backends.cuda.matmul.allow_tf32) or real(*a, **k),
    )
    before = torch.backends.cuda.matmul.allow_tf32
    rng = np.random.default_rng(0)
    RidgeCV(alphas=(1.0,), cv=3, device="cpu").fit(rng.standard_normal((30, 4)), rng.standard_normal((30, 2)))
    assert seen == [before] and torch.backends.cuda.matmul.allow_tf32 == before


def test_scikit_learns_estimator_checks_pass():
    # the whole contract: 1-D y, lists, NotFittedError, NaN/inf, empty, complex and sparse input refused, dtypes,
    # score, tags... Every check applies; none is listed as an expected failure
    from sklearn.utils.estimator_checks import check_estimator

    check_estimator(RidgeCV(device="cpu"))


@pytest.mark.parametrize("shape", [(60, 8), (40, 90)])  # primal and dual folds
def test_out_of_fold_prediction_moments_are_those_of_the_held_out_predictions(shape):
    """cv_prediction_mean_/std_: each sample predicted by the fold that left it out, at the chosen alpha (the mean
    with each fold's intercept, the std about it), repeated rows counted once per sample."""
    rng = np.random.default_rng(3)
    n, p = shape
    distinct = rng.standard_normal((n // 2, p))
    rows = np.concatenate([np.arange(n // 2), np.arange(n // 2)])  # every row shown twice
    Y = distinct[rows] @ rng.standard_normal((p, 3)) + rng.standard_normal((n, 3)) + 2.0
    model = RidgeCV(alphas=(30.0,), cv=4, device="cpu", dtype="float64").fit(distinct, Y, groups=rows, rows=rows)
    held_out, about_intercept = np.empty_like(Y), np.empty_like(Y)
    for validation in make_folds(n, 4, rows):
        train = np.setdiff1d(np.arange(n), validation)
        fold = Ridge(alpha=30.0).fit(distinct[rows[train]], Y[train])
        held_out[validation] = fold.predict(distinct[rows[validation]])
        about_intercept[validation] = held_out[validation] - Y[train].mean(0)
    np.testing.assert_allclose(model.cv_prediction_mean_.numpy(), held_out.mean(0), rtol=1e-6, atol=1e-8)
    np.testing.assert_allclose(model.cv_prediction_std_.numpy(), about_intercept.std(0), rtol=1e-6)
    assert np.all(held_out.std(0) < Y.std(0))  # the shrinkage rescaling undoes


def test_the_trial_space_solution_is_the_ridge_solution():
    """TrialSpaceRidge (fewer trials than voxels) gives solve_ridge's predictions, intercept and map."""
    from brainldm.decoding.ridge import TrialSpaceRidge, solve_ridge

    rng = np.random.default_rng(3)
    X = torch.from_numpy(rng.standard_normal((20, 50))).double()
    Y = torch.from_numpy(rng.standard_normal((20, 7))).double()
    alphas = torch.tensor([0.1, 1.0, 10.0, 100.0, 1.0, 3.0, 30.0], dtype=torch.float64)
    coef, intercept = solve_ridge(X, Y, alphas)
    d, predictions, trial_intercept = TrialSpaceRidge(X).solve(Y, alphas)
    torch.testing.assert_close(predictions, (X - X.mean(0)) @ coef)
    torch.testing.assert_close(trial_intercept, intercept)
    torch.testing.assert_close(TrialSpaceRidge(X).left(d), coef)


def test_a_rank_reduction_over_blocks_is_the_reduction_of_the_whole_map():
    from brainldm.decoding.ridge import RankReduction, reduced_rank, symmetric_sqrt

    rng = np.random.default_rng(4)
    X = torch.from_numpy(rng.standard_normal((60, 12))).double()
    W = torch.from_numpy(rng.standard_normal((12, 30))).double()
    gram = X.T @ X
    whole_left, whole_right = reduced_rank(W, gram, 4)
    reduction, root = RankReduction(4), symmetric_sqrt(gram)
    blocks = (W[:, :11], W[:, 11:25], W[:, 25:])
    for block in blocks:
        reduction.add(root @ block)
    for block in blocks:
        reduction.factor(block, root @ block)
    left, right = reduction.factors()
    torch.testing.assert_close(X @ left @ right, X @ whole_left @ whole_right)
    best = torch.linalg.svd(X @ W)  # and it is the best rank-4 approximation of the predictions
    truncated = best.U[:, :4] @ torch.diag(best.S[:4]) @ best.Vh[:4]
    torch.testing.assert_close(X @ left @ right, truncated)
