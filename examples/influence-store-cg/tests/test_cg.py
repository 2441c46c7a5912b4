"""The cg approximator against direct solves: on explicit matrices, and through influence-store."""

import pytest
import torch

import influence_store as ist
from influence_store.options import parse_options
from influence_store_cg import ConjugateGradient


class MatrixModel:
    """The part of influence-store's TrackedModel that cg uses, backed by an explicit symmetric matrix."""

    def __init__(self, matrix: torch.Tensor) -> None:
        self.matrix = matrix
        self.device = matrix.device
        self.dtype = matrix.dtype

    def hvp(self, vectors: torch.Tensor) -> torch.Tensor:
        return vectors @ self.matrix


def spd_matrix(p: int, condition: float, seed: int = 0) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(p, p, generator=torch.Generator().manual_seed(seed), dtype=torch.float64))
    return q @ torch.diag(torch.logspace(0, torch.log10(torch.tensor(condition)), p, dtype=torch.float64)) @ q.T


def solver(matrix: torch.Tensor, **options) -> ConjugateGradient:
    cg = ConjugateGradient(parse_options(ConjugateGradient.Options, options, "cg"), MatrixModel(matrix))
    cg.prepare()
    return cg


def test_solves_many_right_hand_sides_like_a_direct_solve():
    a = spd_matrix(40, condition=1e3)
    b = torch.randn(7, 40, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    x = solver(a, tol=1e-12).inverse_hvp(b)
    expected = torch.linalg.solve(a, b.T).T
    assert torch.allclose(x, expected, rtol=0, atol=1e-8 * expected.abs().max())


def test_columns_are_independent_cgs():
    """Per-column step sizes and stopping: a vector's solution does not depend on the others in its block."""
    a = spd_matrix(30, condition=1e2)
    eigenvalues, eigenvectors = torch.linalg.eigh(a)
    b = torch.randn(5, 30, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    b[1] = 3 * eigenvectors[:, 7]  # one CG step solves it exactly; a shared step size would not
    b[3] = 0.0
    cg = solver(a, tol=1e-10)
    block = cg.inverse_hvp(b)
    singles = [solver(a, tol=1e-10) for _ in b]
    single = torch.cat([one.inverse_hvp(row[None]) for one, row in zip(singles, b)])
    # Each column stops on its own: the block does the HVPs of the single solves, no more.
    assert [one.diagnostics["hvps"] for one in singles][1::2] == [1, 0]
    assert cg.diagnostics["hvps"] == sum(one.diagnostics["hvps"] for one in singles)
    # Equal up to the solver's own error (BLAS rounds a [5, p] and a [1, p] product differently).
    assert torch.allclose(block, single, rtol=0, atol=1e-9 * single.abs().max())
    assert torch.allclose(block[1], b[1] / eigenvalues[7], rtol=0, atol=1e-14)
    assert torch.equal(block[3], torch.zeros(30, dtype=torch.float64))


def test_damping_makes_a_singular_hessian_solvable():
    u = torch.randn(20, 3, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    a = u @ u.T  # rank 3: singular
    b = torch.randn(4, 20, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    cg = solver(a, damping=0.5, tol=1e-12)
    expected = torch.linalg.solve(a + 0.5 * torch.eye(20, dtype=torch.float64), b.T).T
    assert torch.allclose(cg.inverse_hvp(b), expected, rtol=0, atol=1e-9 * expected.abs().max())
    assert cg.effective_damping == 0.5


def test_diagnostics_record_iterations_and_true_residuals():
    a = spd_matrix(25, condition=1e2)
    b = torch.randn(6, 25, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    cg = solver(a, tol=1e-8)
    x = cg.inverse_hvp(b)
    (solve,) = cg.diagnostics["solves"]
    residual = float(((b - x @ a).norm(dim=1) / b.norm(dim=1)).max())
    assert 1 <= solve["iterations"] <= 2 * 25 and cg.diagnostics["calls"] == 1  # p, and a few for rounding
    assert solve["iterations"] <= cg.diagnostics["hvps"] <= 6 * solve["iterations"]
    assert solve["max_relative_residual"] == pytest.approx(residual, rel=1e-6)
    assert cg.diagnostics["max_relative_residual"] <= 1e-7


def test_negative_curvature_is_an_error_that_suggests_damping():
    a = torch.diag(torch.tensor([2.0, 1.0, -0.5], dtype=torch.float64))
    with pytest.raises(ist.InfluenceStoreError, match=r"negative curvature.*-o damping"):
        solver(a).inverse_hvp(torch.ones(1, 3, dtype=torch.float64))


def test_no_convergence_within_max_iter_is_an_error():
    a = spd_matrix(50, condition=1e6)
    easy = torch.linalg.eigh(a).eigenvectors[:, :1].T  # an eigenvector: solved in one step
    b = torch.cat([torch.ones(2, 50, dtype=torch.float64), easy])
    with pytest.raises(ist.InfluenceStoreError, match=r"did not converge in max_iter=3 iterations for 2 of 3 "
                                                    r"vectors .*-o max_iter"):
        solver(a, max_iter=3).inverse_hvp(b)


@pytest.mark.parametrize("options", [{"tol": 0}, {"max_iter": 0}, {"damping": -1}, {"tolerance": 1e-3}])
def test_bad_options_are_one_line_errors(options):
    with pytest.raises(ist.InfluenceStoreError, match="cg"):
        parse_options(ConjugateGradient.Options, options, "approximator 'cg'")


def test_scores_through_influence_store_match_the_closed_form():
    """Least squares: per-example gradients and H = X^T X / n + l2 I are known in closed form."""
    g = torch.Generator().manual_seed(6)
    x = torch.randn(60, 4, generator=g, dtype=torch.float64)
    y = torch.randn(60, generator=g, dtype=torch.float64)
    model = torch.nn.Linear(4, 1, bias=False).double()

    def loss(model, batch):
        inputs, targets = batch
        return 0.5 * (model(inputs).squeeze(-1) - targets) ** 2

    data = torch.utils.data.TensorDataset
    task = ist.Task(model, loss, data(x[:50], y[:50]), data(x[50:], y[50:]), l2=0.1)
    scores = ist.compute_scores(task, approximator="cg", options={"tol": 1e-10}).matrix()

    w = model.weight.detach().reshape(-1)
    grads = (x @ w - y)[:, None] * x
    hessian = x[:50].T @ x[:50] / 50 + 0.1 * torch.eye(4, dtype=torch.float64)
    expected = grads[50:] @ torch.linalg.solve(hessian, grads[:50].T)
    assert torch.allclose(scores, expected, rtol=0, atol=1e-8 * expected.abs().max())
