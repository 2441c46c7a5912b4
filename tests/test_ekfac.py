"""EK-FAC and the layer view, checked against autograd, the exact solve and kronfluence."""

import pytest
import torch
from torch.utils.data import TensorDataset

import influence_store as ist
from influence_store.errors import InfluenceStoreError
from influence_store.freezing import tracked_parameters
from influence_store.gradients import TrackedModel
from influence_store.layers import LayerView
from tasks import ce_loss


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny problems: one thread is faster, and far faster on a machine busy with other work."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def relative_error(a, b):
    return float((a - b).norm() / b.norm())


def squared_error(model, batch):
    x, y = batch
    return ((model(x) - y) ** 2).sum(-1)


def linear_regression_task(n=200, d=6, outputs=3, l2=0.01):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n + 20, d, generator=g, dtype=torch.float64) * torch.linspace(0.3, 2, d, dtype=torch.float64)
    y = torch.randn(n + 20, outputs, generator=g, dtype=torch.float64)
    model = torch.nn.Linear(d, outputs).double()
    return ist.Task(model, squared_error, TensorDataset(x[:n], y[:n]), TensorDataset(x[n:], y[n:]), l2=l2)


def approximator(task, name, freeze="all", **options):
    from influence_store.options import parse_options
    from influence_store.plugin_manager import lookup

    entry = lookup("register_approximators", name)
    model = TrackedModel(task, tracked_parameters(task.model, freeze))
    instance = entry.cls(parse_options(entry.options_cls, options, name), model, seed=0)
    instance.prepare()
    return instance, model


@pytest.mark.parametrize("strategy", ["ekfac", "kfac"])
def test_equals_the_exact_inverse_where_the_gauss_newton_is_kronecker(strategy):
    """One Linear layer with squared error: the Hessian is E[a a^T] (x) 2I, exactly Kronecker."""
    task = linear_regression_task()
    ekfac, model = approximator(task, "ekfac", strategy=strategy, fisher="gauss-newton", damping=1e-3)
    exact, _ = approximator(task, "exact", damping=1e-3)
    v = torch.randn(5, model.num_params, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    assert relative_error(ekfac.inverse_hvp(v), exact.inverse_hvp(v)) < 1e-9
    assert ekfac.diagnostics["diagonal_parameters"] == []


def test_the_empirical_fisher_is_not_the_hessian():
    """The same model with the empirical Fisher differs (the check above can fail)."""
    task = linear_regression_task()
    ekfac, model = approximator(task, "ekfac", fisher="empirical", damping=1e-3)
    exact, _ = approximator(task, "exact", damping=1e-3)
    v = torch.randn(5, model.num_params, dtype=torch.float64)
    assert relative_error(ekfac.inverse_hvp(v), exact.inverse_hvp(v)) > 0.05


class Mixed(torch.nn.Module):
    """Every layer kind the view knows, plus a LayerNorm (a diagonal block)."""

    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(7, 4, padding_idx=0)
        self.conv1 = torch.nn.Conv1d(4, 3, 3, padding=1, stride=2)
        self.conv2 = torch.nn.Conv2d(1, 2, 3, padding=1, dilation=1, stride=2)
        self.norm = torch.nn.LayerNorm(3)
        self.head = torch.nn.Linear(3 + 8, 2)

    def forward(self, batch):
        tokens, image = batch
        h = self.conv1(self.embed(tokens).transpose(1, 2)).mean(-1)
        i = torch.tanh(self.conv2(image)).flatten(1)
        return self.head(torch.cat([self.norm(h), i], dim=1))


def mixed_task(n=24):
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 7, (n, 6), generator=g)
    images = torch.randn(n, 1, 4, 4, generator=g, dtype=torch.float64)
    labels = torch.randint(0, 2, (n,), generator=g)
    torch.manual_seed(0)
    model = Mixed().double()

    def loss(model, batch):
        tokens, images, labels = batch
        return torch.nn.functional.cross_entropy(model((tokens, images)), labels, reduction="none")

    data = TensorDataset(tokens, images, labels)
    return ist.Task(model, loss, data, data)


def test_layer_view_rebuilds_autograd_per_example_gradients():
    """sum_t ds a^T from the hooks equals vmap per-example gradients, for every layer kind."""
    task = mixed_task()
    model = TrackedModel(task, tracked_parameters(task.model, "all"))
    view = LayerView(model)
    assert [layer.kind for layer in view.layers] == ["embedding", "conv", "conv", "linear"]
    assert view.diagonal_names == ["norm.weight", "norm.bias"]
    indices = list(range(len(task.train)))
    (captured,) = list(view.captures(indices, "empirical"))
    expected = model.per_example_grads("train", indices)
    for layer, block, (a, ds) in zip(view.layers, view.to_matrices(expected), captured):
        assert relative_error(layer.per_example_grads(a, ds), block) < 1e-10, layer.name
    # to_matrices / from_matrices / diagonal round-trip the flat vector
    back = view.from_matrices(view.to_matrices(expected), torch.zeros_like(expected))
    back = view.set_diagonal(view.diagonal(expected), back)
    assert torch.equal(back, expected)


@pytest.mark.parametrize("budget_mb", [64, 0.001])
def test_layer_view_dot_products_equal_flat_per_example_gradients(budget_mb):
    """vectors @ g_i from the hooks, every layer kind and a diagonal block, against vmap gradients; a tiny
    budget takes the examples one at a time."""
    task = mixed_task()
    model = TrackedModel(task, tracked_parameters(task.model, "all"), memory_budget_mb=budget_mb)
    view = LayerView(model)
    vectors = torch.randn(5, model.num_params, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    indices = list(range(3, 17))
    expected = vectors @ model.per_example_grads("train", indices).T
    assert relative_error(view.dot_gradients(vectors, indices), expected) < 1e-10


def test_ekfac_scores_come_from_the_layer_view_and_equal_flat_scores():
    task = mixed_task()
    computation = ist.compute_scores(task, approximator="ekfac", options={"damping": 0.1})
    assert computation.plan.train_grads_cached is False  # nothing flat to cache
    model, ekfac = computation.model, computation.approximator
    g_test = model.per_example_grads("test", range(len(task.test)))
    expected = ekfac.inverse_hvp(g_test) @ model.per_example_grads("train", range(len(task.train))).T
    assert relative_error(computation.matrix(), expected) < 1e-10
    train_mode = ist.compute_scores(task, approximator="ekfac", options={"damping": 0.1}, model_mode="train")
    assert train_mode.approximator.training_dot_products() is None  # the layer view runs in eval mode


class Tied(torch.nn.Module):
    """The embedding's weight is also the output layer, a use the layer view's hooks cannot see."""

    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(7, 4)
        self.mix = torch.nn.Linear(4, 4)

    def forward(self, tokens):
        return torch.tanh(self.mix(self.embed(tokens).mean(1))) @ self.embed.weight.T


def test_tied_weights_take_the_flat_gradients():
    g = torch.Generator().manual_seed(0)
    tokens, labels = torch.randint(0, 7, (20, 5), generator=g), torch.randint(0, 7, (20,), generator=g)
    torch.manual_seed(0)
    model = Tied().double()
    task = ist.Task(model, lambda m, b: torch.nn.functional.cross_entropy(m(b[0]), b[1], reduction="none"),
                    TensorDataset(tokens, labels), TensorDataset(tokens[:6], labels[:6]))
    computation = ist.compute_scores(task, approximator="ekfac", options={"damping": 0.1})
    ekfac, tm = computation.approximator, computation.model
    assert not ekfac.view.reproduces_gradients()
    assert ekfac.training_dot_products() is None and ekfac.self_influence([0, 1]) is None
    assert ekfac.diagnostics["layer_view_gradients"].startswith("not used")
    flat = tm.per_example_grads("train", range(20))
    expected = ekfac.inverse_hvp(tm.per_example_grads("test", range(6))) @ flat.T
    assert relative_error(computation.matrix(), expected) < 1e-10
    assert relative_error(computation.self_influence(), (ekfac.inverse_hvp(flat) * flat).sum(1)) < 1e-10
    assert LayerView(TrackedModel(mixed_task(), tracked_parameters(Mixed(), "all"))).reproduces_gradients()


class Attention(torch.nn.Module):
    """nn.MultiheadAttention multiplies by out_proj.weight itself and never calls the out_proj module."""

    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(7, 4)
        self.attn = torch.nn.MultiheadAttention(4, 2, batch_first=True)
        self.head = torch.nn.Linear(4, 3)

    def forward(self, tokens):
        h = self.embed(tokens)
        return self.head(self.attn(h, h, h, need_weights=False)[0].mean(1))


def test_an_uncalled_layer_says_why_and_how_to_freeze_it():
    g = torch.Generator().manual_seed(0)
    tokens, labels = torch.randint(0, 7, (16, 5), generator=g), torch.randint(0, 3, (16,), generator=g)
    torch.manual_seed(0)
    task = ist.Task(Attention().double(), ce_loss, TensorDataset(tokens, labels), TensorDataset(tokens[:4], labels[:4]))
    with pytest.raises(InfluenceStoreError) as info:
        ist.compute_scores(task, approximator="ekfac", options={"damping": 0.1})
    message = str(info.value)
    assert message.startswith("layer 'attn.out_proj' is tracked but the loss never calls it: its weight is used "
                              "without calling the module (as nn.MultiheadAttention uses its out_proj)")
    assert """freeze_options={"patterns": ['attn.out_proj.']}""" in message and 'approximator="exact"' in message
    frozen = ist.compute_scores(task, approximator="ekfac", options={"damping": 0.1}, freeze="regex",
                                freeze_options={"patterns": [info.value.facts["pattern"]]})
    assert "attn.out_proj.weight" not in frozen.settings["tracked_parameters"]
    assert torch.isfinite(frozen.matrix()).all()


class DictOutput(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(6, 3)

    def forward(self, x):
        return {"y": self.linear(x)}


def test_a_fisher_that_needs_one_tensor_output_names_the_empirical_option():
    task = linear_regression_task(n=20)
    task.model = DictOutput().double()
    task.loss = lambda m, b: ((m(b[0])["y"] - b[1]) ** 2).sum(-1)
    with pytest.raises(InfluenceStoreError) as info:
        ist.compute_scores(task, approximator="ekfac")
    assert str(info.value) == ("the true Fisher needs the model called once per batch with a tensor output; use the "
                               'empirical Fisher: options={"fisher": "empirical"}')
    assert ist.compute_scores(task, approximator="ekfac", options={"fisher": "empirical"}).matrix().isfinite().all()


def test_gauss_newton_fisher_sums_to_the_gauss_newton_matrix():
    """The per-output passes' gradient outer products sum to J^T H_out J (checked with jacobians)."""
    task = mixed_task(n=6)
    model = TrackedModel(task, tracked_parameters(task.model, "all"))
    view = LayerView(model)
    head = view.layers[-1]
    indices = list(range(6))
    total = sum(torch.einsum("boi,bpj->oipj", *(2 * [head.per_example_grads(*c[-1])]))
                for c in view.captures(indices, "gauss-newton"))
    x = task.batch("train", indices)
    features = {}
    task.model.head.register_forward_hook(lambda m, i, o: features.update(a=i[0]))
    logits = task.model((x[0], x[1]))
    p = logits.softmax(-1).detach()
    a = torch.cat([features["a"].detach(), torch.ones(6, 1, dtype=torch.float64)], 1)
    h_out = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]  # softmax cross-entropy curvature
    expected = torch.einsum("bop,bi,bj->oipj", h_out, a, a)  # J = I (x) a for the head's [out, in] block
    assert relative_error(total, expected) < 1e-10


def test_diagonal_block_for_other_parameters_is_recorded():
    task = mixed_task()
    ekfac, model = approximator(task, "ekfac", fisher="empirical", damping=0.1)
    assert ekfac.diagnostics["diagonal_parameters"] == ["norm.weight", "norm.bias"]
    grads = model.per_example_grads("train", list(range(len(task.train))))
    v = torch.randn(2, model.num_params, dtype=torch.float64)
    view = LayerView(model)
    expected = view.diagonal(v) / (view.diagonal(grads).pow(2).mean(0) + 0.1)
    assert relative_error(view.diagonal(ekfac.inverse_hvp(v)), expected) < 1e-10


def digits_small(n=100, hidden=4):
    """A tanh MLP on digits (310 parameters), float64, trained briefly: a non-convex model whose
    Hessian + 0.01 is positive definite, so CG on it converges."""
    from sklearn.datasets import load_digits

    from tasks import DigitsMLP

    x, y = load_digits(return_X_y=True)
    x, y = torch.tensor(x / 16.0), torch.tensor(y)
    torch.manual_seed(0)
    model = DigitsMLP(hidden).double()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(200):
        optimizer.zero_grad()
        ce_loss(model, (x[:n], y[:n])).mean().backward()
        optimizer.step()
    return ist.Task(model, ce_loss, TensorDataset(x[:n], y[:n]), TensorDataset(x[n:n + 8], y[n:n + 8]), l2=1e-3)


@pytest.fixture(scope="module")
def digits():
    task = digits_small()
    exact, model = approximator(task, "exact", damping=0.01)
    g = model.per_example_grads("test", list(range(8)))
    return task, g, exact.inverse_hvp(g)


@pytest.mark.parametrize("method, preconditioner", [("block", "auto"), ("block", "ekfac"), ("vector", "auto")])
def test_refinement_converges_to_exact(digits, method, preconditioner):
    task, g, truth = digits
    ekfac, model = approximator(task, "ekfac", damping=0.01, refine_iters=200, refine_tol=1e-9, refine_method=method,
                                refine_preconditioner=preconditioner)
    refined = ekfac.inverse_hvp(g)
    assert relative_error(refined, truth) < 1e-6
    assert relative_error(ekfac.precondition(g), truth) > 1e-2  # refinement did the work
    trace = ekfac.diagnostics["refine_residual_traces"][0]
    assert trace[-1] < 1e-9 < trace[0] and len(trace) == ekfac.diagnostics["refine_curvature_products"] + 1
    few, _ = approximator(task, "ekfac", damping=0.01, refine_iters=2, refine_method=method,
                          refine_preconditioner=preconditioner)
    assert relative_error(few.inverse_hvp(g), truth) > 1e-6  # the iteration count is honoured
    assert len(few.diagnostics["refine_residual_traces"][0]) == 3
    alone = torch.cat([few.inverse_hvp(g[i:i + 1]) for i in range(2)])  # each vector in a call of its own
    if method == "vector":
        assert relative_error(alone, few.inverse_hvp(g)[:2]) < 1e-10
    else:  # the block shares its search space: more vectors, a better answer from the same 2 products
        assert relative_error(few.inverse_hvp(g)[:2], truth[:2]) < relative_error(alone, truth[:2])


def test_refinement_without_the_preconditioner_is_plain_block_cg(digits, monkeypatch):
    from influence_store.solvers import block_pcg

    task, g, truth = digits
    ekfac, model = approximator(task, "ekfac", damping=0.01, refine_iters=200, refine_tol=1e-9,
                                refine_preconditioner="none")
    monkeypatch.setattr(ekfac, "precondition", lambda r: pytest.fail("the factors were used"))
    assert relative_error(ekfac.inverse_hvp(g), truth) < 1e-6
    few, _ = approximator(task, "ekfac", damping=0.01, refine_iters=3, refine_preconditioner="none")
    plain, trace, _, _ = block_pcg(lambda v: model.hvp(v).double() + 0.01 * v, lambda r: r, g.double(), 3, 0.0)
    assert relative_error(few.inverse_hvp(g), plain) < 1e-10
    assert few.diagnostics["refine_residual_traces"][0] == pytest.approx(trace, rel=1e-6)
    auto, _ = approximator(task, "ekfac", damping=0.01, refine_iters=3)  # the default: none from 32 vectors
    block = torch.cat([g] * 4)
    assert len(block) == 32 and torch.equal(auto.inverse_hvp(block), few.inverse_hvp(block))
    preconditioned, _ = approximator(task, "ekfac", damping=0.01, refine_iters=3, refine_preconditioner="ekfac")
    assert torch.equal(auto.inverse_hvp(g), preconditioned.inverse_hvp(g))  # a small block keeps them
    assert auto.diagnostics["refine_preconditioners_used"] == ["ekfac", "none"]


def test_refinement_on_the_gauss_newton_matrix_reduces_its_residual(digits):
    from influence_store.layers import gauss_newton_product

    task, g, _ = digits
    ekfac, model = approximator(task, "ekfac", fisher="gauss-newton", damping=0.01, refine_iters=5,
                                refine_curvature="gauss-newton")
    refined = ekfac.inverse_hvp(g[:2])
    trace = ekfac.diagnostics["refine_residual_traces"][0]
    assert trace[-1] < trace[0] / 3
    residual = g[:2] - gauss_newton_product(LayerView(model), refined) - 0.01 * refined
    assert float((residual.norm(dim=1) / g[:2].norm(dim=1)).max()) == pytest.approx(trace[-1], rel=1e-6)


def test_block_cg_solves_dependent_rows_and_stops_at_negative_curvature():
    from influence_store.solvers import block_pcg, lowest_curvature, pcg

    torch.manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(40, 40, dtype=torch.float64))
    spd = q @ torch.diag(torch.logspace(-2, 1, 40, dtype=torch.float64)) @ q.T
    b = torch.randn(3, 40, dtype=torch.float64)
    b = torch.cat([b, b[:1] * 2, b[1:2] - b[2:3]])  # two rows that add no direction of their own
    x, trace, products, negative = block_pcg(lambda v: v @ spd, lambda r: r, b, 100, 1e-10)
    assert torch.allclose(x, torch.linalg.solve(spd, b.T).T, rtol=0, atol=1e-8 * float(x.abs().max()))
    assert trace[-1] < 1e-10 and negative is None and products == len(trace) - 1 < 40

    indefinite = spd - 0.5 * torch.outer(q[:, 0], q[:, 0]) - 0.5 * torch.outer(q[:, 1], q[:, 1])
    lowest = float(torch.linalg.eigvalsh(indefinite)[0])
    for solve in (block_pcg, pcg):  # each reports a Rayleigh quotient <= 0, a bound on the lowest eigenvalue
        x, trace, products, negative = solve(lambda v: v @ indefinite, lambda r: r, b, 100, 1e-10)
        assert negative is not None and lowest <= negative <= 0 and products < 40
    start = torch.randn(1, 40, dtype=torch.float64)
    assert lowest_curvature(lambda v: v @ indefinite, start) == pytest.approx(lowest, rel=1e-10)


@pytest.mark.parametrize("method", ["block", "vector"])
def test_refinement_refuses_an_indefinite_hessian_and_names_a_damping_that_works(digits, method):
    """H + l2 of the tanh MLP has eigenvalue -1e-3: CG's iterate there is no inverse (it used to be stored as
    the scores). The error reports the lowest eigenvalue and a damping with which refinement then converges."""
    task, g, _ = digits
    model = TrackedModel(task, tracked_parameters(task.model, "all"))
    lowest = float(torch.linalg.eigvalsh(model.dense_hessian())[0])
    assert lowest < 0
    ekfac, _ = approximator(task, "ekfac", refine_iters=200, refine_method=method)
    with pytest.raises(InfluenceStoreError, match="negative curvature") as info:
        ekfac.inverse_hvp(g)
    assert info.value.facts["lowest"] == pytest.approx(lowest, rel=1e-6)
    damping = info.value.facts["damping"]
    assert damping > -lowest and f'{{"damping": {damping:.3g}}}' in str(info.value)
    refined, _ = approximator(task, "ekfac", damping=damping, refine_iters=200, refine_tol=1e-9, refine_method=method)
    truth = torch.linalg.solve(model.dense_hessian() + damping * torch.eye(model.num_params, dtype=torch.float64), g.T)
    assert relative_error(refined.inverse_hvp(g), truth.T) < 1e-6


def test_block_cg_is_the_best_answer_in_its_block_krylov_space_for_short_and_long_rows():
    """After m products, every row's iterate is the Galerkin solution over span{Z, (MA)Z, ..., (MA)^(m-1) Z},
    Z = M B, built here with explicit orthogonalization; rows as short as 1e-7 (a test example the model
    already fits) must keep their directions in that space."""
    from influence_store.solvers import block_pcg

    torch.manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(60, 60, dtype=torch.float64))
    spd = q @ torch.diag(torch.logspace(-2, 1, 60, dtype=torch.float64)) @ q.T
    m_half = torch.randn(60, 60, dtype=torch.float64) / 60 + torch.eye(60, dtype=torch.float64)
    preconditioner = m_half @ m_half.T
    b = torch.randn(6, 60, dtype=torch.float64) * torch.logspace(-7, 0, 6, dtype=torch.float64)[:, None]
    for products in (1, 2, 3):
        blocks, z = [], b @ preconditioner
        for _ in range(products):
            if blocks:
                basis = torch.cat(blocks)
                z = z - (z @ basis.T) @ basis
            blocks.append(torch.linalg.qr(z.T).Q.T)
            z = blocks[-1] @ spd @ preconditioner
        k = torch.cat(blocks)
        galerkin = torch.linalg.solve(k @ spd @ k.T, k @ b.T).T @ k
        x, trace, used, _ = block_pcg(lambda v: v @ spd, lambda r: r @ preconditioner, b, products, 0.0)
        assert used == products and len(trace) == products + 1
        assert torch.allclose(x, galerkin, rtol=1e-8, atol=0), products


def test_bad_options_are_clear_errors():
    task = linear_regression_task()
    with pytest.raises(InfluenceStoreError, match="strategy must be ekfac or kfac"):
        ist.compute_scores(task, approximator="ekfac", options={"strategy": "kfc"})
    with pytest.raises(InfluenceStoreError, match="fisher must be one of"):
        ist.compute_scores(task, approximator="ekfac", options={"fisher": "real"})
    with pytest.raises(InfluenceStoreError, match="refine_preconditioner must be auto, ekfac or none"):
        ist.compute_scores(task, approximator="ekfac", options={"refine_preconditioner": "jacobi"})


class SmallCNN(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 4, 3, padding=1)
        self.conv2 = torch.nn.Conv2d(4, 4, 3, stride=2)
        self.fc = torch.nn.Linear(4 * 3 * 3, 10)

    def forward(self, x):
        h = torch.relu(self.conv2(torch.relu(self.conv(x))))
        return self.fc(h.flatten(1))


def trained_classifier(kind, n_train=256, n_test=12):
    """The digits MLP or a small CNN on 8x8 digit images, float32, trained briefly with Adam."""
    from sklearn.datasets import load_digits

    from tasks import DigitsMLP

    x, y = load_digits(return_X_y=True)
    x, y = torch.tensor(x / 16.0, dtype=torch.float32), torch.tensor(y)
    if kind == "cnn":
        x = x.reshape(-1, 1, 8, 8)
    torch.manual_seed(0)
    model = DigitsMLP(16) if kind == "mlp" else SmallCNN()
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-2)
    for _ in range(20):
        optimizer.zero_grad()
        ce_loss(model, (x[:n_train], y[:n_train])).mean().backward()
        optimizer.step()
    train = TensorDataset(x[:n_train], y[:n_train])
    test = TensorDataset(x[n_train:n_train + n_test], y[n_train:n_train + n_test])
    return ist.Task(model, ce_loss, train, test)


@pytest.mark.parametrize("kind, strategy", [("mlp", "ekfac"), ("mlp", "kfac"), ("cnn", "ekfac")])
def test_parity_with_kronfluence(kind, strategy):
    """Pairwise scores against kronfluence's at the same Fisher (empirical: no sampling noise) and ridge."""
    pytest.importorskip("kronfluence", reason="kronfluence 1.0.1 is a test extra (scripts/test.sh installs it)")
    from kronfluence_peer import kronfluence_scores

    task = trained_classifier(kind, n_train=128 if kind == "mlp" else 64, n_test=8)
    ridge = 1e-3
    ours = ist.compute_scores(task, approximator="ekfac",
                              options={"damping": ridge, "fisher": "empirical", "strategy": strategy})
    matrix = ours.matrix()
    peer, peer_self = kronfluence_scores(task.model, task.train, task.test, ridge=ridge, strategy=strategy,
                                         self_influence=kind == "mlp", release_memory=False)
    columns = [float(torch.corrcoef(torch.stack([matrix[t], peer[t]]))[0, 1]) for t in range(len(task.test))]
    assert min(columns) >= 0.99, columns
    if peer_self is not None:
        own = ours.self_influence()
        assert float(torch.corrcoef(torch.stack([own, peer_self]))[0, 1]) >= 0.99
    # the parity can fail: the Gauss-Newton factors give different scores
    other = ist.compute_scores(task, approximator="ekfac", options={"damping": 1.0, "fisher": "empirical",
                                                                    "strategy": strategy}).matrix()
    assert relative_error(other, peer) > 0.05


def test_resumed_run_reuses_the_stored_factors(monkeypatch):
    from influence_store.runs import APPROXIMATOR_STATE, execute_run
    from influence_store.store import Store

    task = trained_classifier("mlp", n_train=32, n_test=2)
    store = Store()
    calls = []
    original = Store.write_self_influence

    def fail_once(self, run_id, values, start=0):
        calls.append(run_id)
        if len(calls) == 1:
            raise InfluenceStoreError("disk full")
        return original(self, run_id, values, start)

    monkeypatch.setattr(Store, "write_self_influence", fail_once)
    options = {"damping": 0.01}
    with pytest.raises(InfluenceStoreError, match="disk full"):
        execute_run(store, task, approximator="ekfac", options=options)
    run_id = calls[0]
    assert store.run(run_id)["status"] == "failed"
    saved = store.artifact(run_id, APPROXIMATOR_STATE)
    assert saved is not None
    result = execute_run(store, task, approximator="ekfac", options=options, resume=run_id)
    assert (result.run_id, result.outcome) == (run_id, "resumed")
    assert store.run(run_id)["diagnostics"]["approximator"]["factors"] == "reused"
    fresh = ist.compute_scores(task, approximator="ekfac", options=options)
    stored = dict(store.score_rows(run_id, store.test_example_id(run_id, "0")))
    assert len(stored) == 32
    assert sorted(stored.values()) == pytest.approx(sorted(fresh.matrix()[0].tolist()), rel=1e-6)


def test_gauss_newton_product_equals_the_hessian_of_a_linear_model():
    """Squared error on a Linear model: the Gauss-Newton matrix is the Hessian (autograd HVPs)."""
    from influence_store.layers import gauss_newton_product

    task = linear_regression_task(n=50)
    model = TrackedModel(task, tracked_parameters(task.model, "all"))
    v = torch.randn(3, model.num_params, dtype=torch.float64)
    assert relative_error(gauss_newton_product(LayerView(model), v, batch_size=16), model.hvp(v)) < 1e-10


@pytest.mark.parametrize("fisher", ["empirical", "true"])
def test_self_influence_from_the_layer_view_equals_the_flat_inverse_hvp(fisher):
    """g_i^T P g_i from each layer's rows (embedding, convolutions, Linear, the diagonal block) equals
    the flat path, g_i . inverse_hvp(g_i), whichever way round each convolution is rotated."""
    from influence_store.plugins.ekfac import _rotated_square_sum

    task = mixed_task()
    ekfac, model = approximator(task, "ekfac", fisher=fisher, damping=0.05, batch_size=7)
    indices = list(range(len(task.train)))
    grads = model.per_example_grads("train", indices)
    expected = (ekfac.inverse_hvp(grads) * grads).sum(1)
    direct = ekfac.self_influence(indices)
    torch.testing.assert_close(direct, expected, rtol=1e-10, atol=1e-12)
    (captured,) = ekfac.view.captures(indices, "empirical")
    for layer, rotation, (a, ds) in zip(ekfac.view.layers, ekfac._rotations, captured):
        if layer.kind == "conv":
            by = [_rotated_square_sum(layer, *rotation, a, ds, 2**30, order) for order in ("rows", "gradient")]
            torch.testing.assert_close(by[0], by[1], rtol=1e-10, atol=1e-12)
    refined, _ = approximator(task, "ekfac", fisher=fisher, damping=0.05, refine_iters=3)
    assert refined.self_influence(indices) is None  # the refined inverse: the flat path


def test_corrected_eigenvalues_are_the_mean_squared_rotated_gradients():
    """EK-FAC's eigenvalues (empirical Fisher) are mean_i (Q_S^T G_i Q_A)^2, G_i from autograd."""
    task = mixed_task()
    ekfac, model = approximator(task, "ekfac", fisher="empirical", batch_size=5)
    grads = model.per_example_grads("train", list(range(len(task.train))))
    for layer, block in zip(ekfac._factors["layers"], ekfac.view.to_matrices(grads)):
        rotated = layer["qs"].T @ block
        rotated = rotated @ layer["qa"] if layer["qa"] is not None else rotated
        assert relative_error(layer["eigenvalues"], (rotated * rotated).mean(0)) < 1e-10
