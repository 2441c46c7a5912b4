"""The exact solver against the closed form and against actual leave-one-out retraining."""

import pytest
import torch
from scipy.stats import pearsonr, spearmanr
from torch.utils.data import TensorDataset

import closed_form
import influence_store as ist
from tasks import breast_cancer_task, fit_logistic
from test_lissa import Quadratic


@pytest.fixture(scope="module")
def task():
    return breast_cancer_task()


@pytest.fixture(scope="module")
def exact(task):
    return ist.compute_scores(task, approximator="exact")


def relative_error(a, b):
    return float((a - b).norm() / b.norm())


def test_scores_equal_the_closed_form_influence(task, exact):
    assert relative_error(exact.matrix(), closed_form.scores(task)) < 1e-6


def test_damping_is_a_true_ridge(task):
    damped = ist.compute_scores(task, approximator="exact", options={"damping": 0.05}).matrix()
    assert relative_error(damped, closed_form.scores(task, damping=0.05)) < 1e-6
    assert relative_error(damped, closed_form.scores(task)) > 0.1


def test_reports_the_hessian_spectrum(task, exact):
    eigenvalues = torch.linalg.eigvalsh(closed_form.hessian(task.model, task.train.tensors[0], task.l2))
    diagnostics = exact.diagnostics["approximator"]
    assert diagnostics["solver"] == "cholesky"
    assert diagnostics["min_eigenvalue"] == pytest.approx(float(eigenvalues[0]), rel=1e-8)
    assert diagnostics["max_eigenvalue"] == pytest.approx(float(eigenvalues[-1]), rel=1e-8)


def test_scores_predict_leave_one_out_retraining(task, exact):
    """score / n_train predicts the test-loss change when a training example is removed and the model
    retrained (warm-started Newton to gradient norm < 1e-8): checked on the 40 largest-|score|
    training points of each of the 3 highest-loss test points."""
    xtr, ytr = task.train.tensors
    xte, yte = task.test.tensors
    n = len(xtr)
    scores = exact.matrix()
    for t in exact.test_losses.argsort(descending=True)[:3].tolist():
        before = float(closed_form.mean_loss(task.model, xte[t:t + 1], yte[t:t + 1]))
        chosen = scores[t].abs().argsort(descending=True)[:40].tolist()
        predicted, actual = [], []
        for i in chosen:
            keep = torch.arange(n) != i
            retrained = fit_logistic(xtr[keep], ytr[keep], task.l2, init=task.model, grad_tol=1e-8)
            actual.append(float(closed_form.mean_loss(retrained, xte[t:t + 1], yte[t:t + 1])) - before)
            predicted.append(float(scores[t, i]) / n)
        assert pearsonr(predicted, actual)[0] >= 0.95
        assert spearmanr(predicted, actual)[0] >= 0.97
        # score > 0 means removal raises the test loss: signs agree wherever the effect is not tiny
        assert all((p > 0) == (a > 0) for p, a in zip(predicted, actual) if abs(a) > 1e-4)


def test_above_max_params_is_refused_naming_the_ways_out(task):
    with pytest.raises(ist.InfluenceStoreError, match=r"max_params=30.*lissa.*freeze=") as info:
        ist.compute_scores(task, approximator="exact", options={"max_params": 30})
    assert "\n" not in str(info.value)
    ist.compute_scores(task, approximator="exact", options={"max_params": 31})


def test_indefinite_hessian_falls_back_to_the_pseudo_inverse():
    """A loss with negative curvature (not a convex model): H = diag(0.5, -0.5), Cholesky fails."""
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    sign = torch.tensor([1.0, -1.0], dtype=torch.float64)
    task = ist.Task(Quadratic(), lambda model, batch: 0.5 * batch[1] * model(batch[0]) ** 2,
                    TensorDataset(x, sign), TensorDataset(x, sign))
    computation = ist.compute_scores(task, approximator="exact")
    diagnostics = computation.diagnostics["approximator"]
    assert diagnostics["solver"] == "eigh-pseudo-inverse"
    assert (diagnostics["min_eigenvalue"], diagnostics["max_eigenvalue"]) == pytest.approx((-0.5, 0.5))
    v = torch.tensor([[1.0, 3.0]], dtype=torch.float64)
    torch.testing.assert_close(computation.approximator.inverse_hvp(v), torch.tensor([[2.0, -6.0]],
                                                                                     dtype=torch.float64))


def test_singular_hessian_drops_the_null_space():
    """The second parameter never enters the loss: its zero eigenvalue is dropped, not inverted."""
    x = torch.tensor([[1.0, 0.0], [2.0, 0.0]], dtype=torch.float64)
    y = torch.zeros(2, dtype=torch.float64)
    task = ist.Task(Quadratic(), lambda model, batch: 0.5 * (model(batch[0]) - batch[1]) ** 2,
                    TensorDataset(x, y), TensorDataset(x, y))
    computation = ist.compute_scores(task, approximator="exact")
    assert computation.diagnostics["approximator"]["dropped_eigenvalues"] == 1
    v = torch.tensor([[2.5, 1.0]], dtype=torch.float64)  # H = diag(2.5, 0): pinv(H) v = (1, 0)
    torch.testing.assert_close(computation.approximator.inverse_hvp(v), torch.tensor([[1.0, 0.0]],
                                                                                     dtype=torch.float64))
