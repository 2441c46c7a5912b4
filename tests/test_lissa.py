"""LiSSA: one step by hand, convergence to the ridge inverse, depth modes, divergence, scale=auto."""

import math

import pytest
import torch
from torch.utils.data import TensorDataset

import closed_form
import influence_store as ist
from tasks import breast_cancer_task


class Quadratic(torch.nn.Module):
    """A 2-parameter linear model; with a squared loss its Hessian is a constant 2x2 matrix."""

    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.tensor([0.3, -0.2], dtype=torch.float64))

    def forward(self, x):
        return x @ self.w


def squared_loss(model, batch):
    x, y = batch
    return 0.5 * (model(x) - y) ** 2


def quadratic_task(l2=0.5):
    # H = mean(x x^T) + l2 I = [[1, 1], [1, 2]] + 0.5 I
    x = torch.tensor([[1.0, 0.0], [1.0, 2.0]], dtype=torch.float64)
    y = torch.tensor([1.0, -1.0], dtype=torch.float64)
    return ist.Task(Quadratic(), squared_loss, TensorDataset(x, y), TensorDataset(x, y), l2=l2)


def lissa(task, **options):
    return ist.compute_scores(task, approximator="lissa", options=options).approximator


def count_hvps(approximator):
    """Wrap the curvature operator so a test can see how many recursion steps really ran."""
    calls = []
    hvp = approximator.model.hvp

    def counted(vectors, indices=None):
        calls.append(None if indices is None else len(indices))
        return hvp(vectors, indices)

    approximator.model.hvp = counted
    return calls


def test_one_step_by_hand_on_a_2x2_quadratic():
    approximator = lissa(quadratic_task(), batch_size=2, damping=0.1, scale=10.0, depth_iters=1)
    v = torch.tensor([[1.0, -1.0]], dtype=torch.float64)
    # H v = [[1.5, 1], [1, 2.5]] (1, -1) = (0.5, -1.5)
    # h_1 = v + 0.9 v - H v / 10 = (1.9 - 0.05, -1.9 + 0.15) = (1.85, -1.75); estimate = h_1 / 10
    expected = torch.tensor([[0.185, -0.175]], dtype=torch.float64)
    torch.testing.assert_close(approximator.inverse_hvp(v), expected, rtol=1e-12, atol=1e-14)


def partial_sum(h, v, damping, scale, steps):
    """``(1/scale) sum_{j<=steps} A^j v`` with ``A = (1 - damping) I - H / scale``: LiSSA on the full batch."""
    a = (1 - damping) * torch.eye(len(h), dtype=h.dtype) - h / scale
    total, term = v.clone(), v.clone()
    for _ in range(steps):
        term = a @ term
        total += term
    return total / scale


def test_full_batch_recursion_is_the_neumann_partial_sum():
    task = quadratic_task()
    h = torch.tensor([[1.5, 1.0], [1.0, 2.5]], dtype=torch.float64)
    approximator = lissa(task, batch_size=2, damping=0.05, scale=4.0, depth_iters=7)
    v = torch.tensor([[1.0, -1.0], [0.5, 2.0]], dtype=torch.float64)
    expected = torch.stack([partial_sum(h, row, 0.05, 4.0, 7) for row in v])
    torch.testing.assert_close(approximator.inverse_hvp(v), expected, rtol=1e-12, atol=1e-14)


@pytest.fixture(scope="module")
def logistic():
    """breast_cancer L2 logistic regression with its closed-form Hessian and some test gradients."""
    task = breast_cancer_task()
    xtr, _ = task.train.tensors
    xte, yte = task.test.tensors
    return task, closed_form.hessian(task.model, xtr, task.l2), closed_form.grads(task.model, xte[:5], yte[:5])


@pytest.mark.parametrize("damping, scale, steps", [(0.02, 0.5, 600), (0.0, 0.5, 1200)])
def test_converges_to_the_ridge_inverse(logistic, damping, scale, steps):
    """With the full set as the batch, LiSSA reaches (H + damping * scale * I)^-1 v; damping 0 gives H^-1 v."""
    task, h, v = logistic
    n = len(task.train)
    approximator = lissa(task, batch_size=n, damping=damping, scale=scale, depth_iters=steps)
    assert approximator.effective_damping == pytest.approx(damping * scale)
    expected = torch.linalg.solve(h + damping * scale * torch.eye(len(h), dtype=h.dtype), v.T).T
    estimate = approximator.inverse_hvp(v)
    assert float((estimate - expected).norm() / expected.norm()) < 1e-4


def reference_lissa(task, v, batch_size, damping, scale, steps, num_samples, seed):
    """AllenNLP's recursion written out with closed-form batch Hessians and the documented batch order
    (shuffled epochs from ``torch.Generator().manual_seed(seed)``, continued across samples)."""
    xtr, _ = task.train.tensors
    n = len(xtr)
    generator = torch.Generator().manual_seed(seed)

    def batches():
        while True:
            order = torch.randperm(n, generator=generator)
            yield from (order[s:s + batch_size] for s in range(0, n, batch_size))

    stream = batches()
    total = torch.zeros_like(v)
    for _ in range(num_samples):
        h = v.clone()
        for _ in range(steps):
            hessian = closed_form.hessian(task.model, xtr, task.l2, next(stream))
            h = v + (1 - damping) * h - h @ hessian / scale
        total += h / scale
    return total / num_samples


def test_stochastic_batches_and_samples_match_a_reference_recursion(logistic):
    task, _, v = logistic
    options = dict(batch_size=16, damping=0.01, scale=5.0, depth_iters=40, num_samples=3)
    approximator = ist.compute_scores(task, approximator="lissa", options=options, seed=7).approximator
    expected = reference_lissa(task, v, steps=40, seed=7, **{k: options[k] for k in
                                                             ("batch_size", "damping", "scale", "num_samples")})
    torch.testing.assert_close(approximator.inverse_hvp(v), expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("options, expected_steps", [
    ({}, int(math.ceil(455 / 8) * 0.25)),                            # AllenNLP default: a quarter epoch, rounded down
    ({"depth_fraction": 0.1}, int(math.ceil(455 / 8) * 0.1)),
    ({"depth_fraction": 2.0, "batch_size": 100}, 10),                # two epochs of 5 batches
    ({"depth_iters": 7}, 7),
])
def test_depth_modes_run_the_stated_number_of_steps(logistic, options, expected_steps):
    task, _, v = logistic
    approximator = lissa(task, **options)
    calls = count_hvps(approximator)
    approximator.inverse_hvp(v)
    assert len(calls) == expected_steps == approximator.diagnostics["steps_run"]
    assert set(calls) <= {options.get("batch_size", 8), 455 % options.get("batch_size", 8)}


def test_a_tiny_train_set_still_runs_one_step():
    task = quadratic_task()
    approximator = lissa(task, batch_size=8, depth_fraction=0.01, damping=0.1, scale=10.0)
    calls = count_hvps(approximator)
    v = torch.tensor([[1.0, -1.0]], dtype=torch.float64)
    estimate = approximator.inverse_hvp(v)
    assert len(calls) == 1 == approximator.diagnostics["steps_run"]
    assert "ran 1 step" in approximator.diagnostics["depth_note"]  # AllenNLP would have run none
    torch.testing.assert_close(estimate, torch.tensor([[0.185, -0.175]], dtype=torch.float64))


def test_divergence_is_an_error_that_suggests_a_larger_scale(logistic):
    task, h, v = logistic
    top = float(torch.linalg.eigvalsh(h)[-1])
    approximator = lissa(task, batch_size=len(task.train), damping=0.0, scale=top / 4, depth_iters=200)
    with pytest.raises(ist.InfluenceStoreError, match="diverged.*larger scale"):
        approximator.inverse_hvp(v)


def test_divergence_under_auto_scale_suggests_damping_not_auto_scale_again(logistic):
    task, _, v = logistic
    approximator = lissa(task, batch_size=len(task.train), damping=0.0, scale="auto", depth_iters=200)
    approximator.scale /= 6  # as if the power iteration had underestimated the curvature
    with pytest.raises(ist.InfluenceStoreError) as info:
        approximator.inverse_hvp(v)
    assert "with scale auto" in str(info.value) and "add damping" in str(info.value)
    assert 'options={"scale": "auto"}' not in str(info.value)


def test_divergence_stops_compute_scores_before_any_nan_score():
    task = breast_cancer_task(n_train=60)
    computation = ist.compute_scores(task, approximator="lissa", options={"scale": 0.01, "depth_iters": 100})
    with pytest.raises(ist.InfluenceStoreError, match="scale"):
        next(computation.chunks())


def test_auto_scale_sits_above_the_top_eigenvalue(logistic):
    task, h, _ = logistic
    approximator = lissa(task, scale="auto", depth_iters=1)
    top = float(torch.linalg.eigvalsh(h)[-1])
    assert approximator.diagnostics["top_eigenvalue"] == pytest.approx(top, rel=1e-3)
    assert approximator.scale == pytest.approx(1.5 * top, rel=1e-3)


def test_auto_scale_converges_like_exact():
    """scale=auto, damping=0, batch_size=128 agrees with the exact solver over all scores."""
    task = breast_cancer_task()
    exact = ist.compute_scores(task, approximator="exact").matrix()
    computation = ist.compute_scores(task, approximator="lissa",
                                     options={"scale": "auto", "damping": 0, "batch_size": 128})
    scores = computation.matrix()
    assert computation.diagnostics["approximator"]["converged"]
    pearson = torch.corrcoef(torch.stack([exact.flatten(), scores.flatten()]))[0, 1]
    assert pearson >= 0.99


def test_auto_scale_stops_at_max_iters_and_says_it_did_not_converge(logistic):
    """tol=0 can never be met: the recursion stops at max_iters, records that, and returns a finite
    estimate together with the norm trace of its iterates."""
    task, _, v = logistic
    approximator = lissa(task, scale="auto", damping=0, batch_size=128, tol=0.0, max_iters=60)
    calls = count_hvps(approximator)
    estimate = approximator.inverse_hvp(v)
    diagnostics = approximator.diagnostics
    assert len(calls) == 60 and diagnostics["steps_run"] == 60 and diagnostics["converged"] is False
    assert torch.isfinite(estimate).all()
    steps = [step for step, _ in diagnostics["norm_trace"]]
    assert steps[:10] == list(range(1, 11)) and steps[-1] == 60


def test_auto_scale_per_vector_estimate_does_not_depend_on_its_neighbours(logistic):
    """Each vector stops on its own convergence test, so sharing a call with others changes nothing."""
    task, _, v = logistic
    options = {"scale": "auto", "damping": 0, "batch_size": 128, "tol": 0.05}
    together = lissa(task, **options).inverse_hvp(v)
    alone = torch.cat([lissa(task, **options).inverse_hvp(v[i:i + 1]) for i in (3, 0)])
    torch.testing.assert_close(alone, together[[3, 0]], rtol=1e-12, atol=1e-14)


def test_same_seed_same_scores_other_seed_other_scores():
    task = breast_cancer_task(n_train=100)
    run = lambda seed: ist.compute_scores(task, approximator="lissa", seed=seed,  # noqa: E731
                                          options={"scale": 5.0, "batch_size": 4}).matrix()
    first = run(3)
    assert torch.equal(first, run(3))
    assert not torch.allclose(first, run(4))


@pytest.mark.parametrize("options, message", [
    ({"scale": "big"}, "scale"),
    ({"scale": -1}, "scale"),
    ({"damping": 1.5}, "damping"),
    ({"batch_size": 0}, "batch_size"),
    ({"depth_fraction": 0.5, "depth_iters": 3}, "not both"),
    ({"depht_iters": 3}, "valid options: batch_size, damping"),
])
def test_bad_options_are_one_line_errors(options, message):
    with pytest.raises(ist.InfluenceStoreError, match=message) as info:
        ist.compute_scores(quadratic_task(), approximator="lissa", options=options)
    assert "\n" not in str(info.value)
