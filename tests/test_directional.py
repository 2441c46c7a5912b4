"""Training scores by forward-mode derivatives (directional.py): the same scores as flat per-example
gradients, chosen only where they pay, and flat gradients again where batched examples interact."""

import torch
from torch.utils.data import TensorDataset

import influence_store as ist
import influence_store.directional as directional
from influence_store.directional import DirectionalDots, directional_pays
from influence_store.gradients import TrackedModel


def ce(model, batch):
    x, y = batch
    return torch.nn.functional.cross_entropy(model(x), y, reduction="none")


def mlp():
    return torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3)).double()


def task_of(model, n_train=60, n_test=5, features=6):
    torch.manual_seed(0)
    x = torch.randn(n_train + n_test, features, dtype=torch.float64)
    y = torch.randint(0, 3, (n_train + n_test,))
    return ist.Task(model, ce, TensorDataset(x[:n_train], y[:n_train]), TensorDataset(x[n_train:], y[n_train:]),
                    l2=0.01)


def tracked(task, **kw):
    return TrackedModel(task, [n for n, _ in task.model.named_parameters()], **kw)


def test_forward_mode_dots_equal_autograd_gradients_dotted(monkeypatch):
    torch.manual_seed(1)
    task = task_of(mlp())
    model = tracked(task)
    monkeypatch.setattr(directional, "CPU_PIECE_BYTES", 7 * 3 * 3 * model.activation_floats() * 8)  # batches of 7
    vectors = torch.randn(3, model.num_params, dtype=torch.float64)
    dots = DirectionalDots(model)(vectors, range(len(task.train)))
    x, y = task.train.tensors
    rows = []
    for i in range(len(x)):
        task.model.zero_grad()
        ce(task.model, (x[i:i + 1], y[i:i + 1])).sum().backward()
        rows.append(torch.cat([p.grad.reshape(-1) for p in task.model.parameters()]))
    torch.testing.assert_close(dots, vectors @ torch.stack(rows).T, rtol=1e-10, atol=1e-12)
    assert model.notes == []


def test_scores_only_runs_use_forward_mode_and_give_the_same_scores():
    task = task_of(mlp())
    with_self = ist.compute_scores(task, "exact", self_influence=True)
    scores_only = ist.compute_scores(task, "exact", self_influence=False)
    assert with_self.diagnostics["training_dots"] == "gradients"
    assert scores_only.diagnostics["training_dots"] == "directional"
    torch.testing.assert_close(scores_only.matrix(), with_self.matrix(), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(scores_only.self_influence(), with_self.self_influence(), rtol=1e-10, atol=1e-12)


def test_examples_the_model_is_sure_of_keep_forward_mode():
    """Forward mode loses the dots of examples whose softmax probabilities vanish beside 1 (here about 1e-15
    against dots near 1e-1); the check judges that against the batch's dots, so the run keeps forward mode
    and its scores equal the gradients'."""
    torch.manual_seed(0)
    task = task_of(torch.nn.Linear(6, 3).double())
    x, y = task.train.tensors
    x[:2] *= 80.0  # the first two (the checked ones): probabilities 1e-17 and below beside 1
    with torch.no_grad():
        y[:2] = task.model(x[:2]).argmax(1)
    with_self = ist.compute_scores(task, "exact", self_influence=True)
    scores_only = ist.compute_scores(task, "exact", self_influence=False)
    matrix = scores_only.matrix()
    assert scores_only.diagnostics["training_dots"] == "directional" and scores_only.model.notes == []
    torch.testing.assert_close(matrix, with_self.matrix(), rtol=0, atol=1e-10 * float(matrix.abs().max()))


class BatchCentered(torch.nn.Module):
    """Centres its inputs by half the batch mean: a batch's losses differ from its examples' own."""

    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(6, 3).double()

    def forward(self, x):
        return self.linear(x - 0.5 * x.mean(0, keepdim=True))


def test_examples_that_interact_within_a_batch_fall_back_to_per_example_gradients():
    task = task_of(BatchCentered())
    with_self = ist.compute_scores(task, "exact", self_influence=True)
    scores_only = ist.compute_scores(task, "exact", self_influence=False)
    assert scores_only.diagnostics["training_dots"] == "directional"
    torch.testing.assert_close(scores_only.matrix(), with_self.matrix(), rtol=1e-10, atol=1e-12)
    assert any("examples interact within a batch" in note for note in scores_only.model.notes)
    assert scores_only.diagnostics["training_dots"] == "gradients"  # what ran


def test_forward_mode_is_chosen_only_where_it_pays():
    model = tracked(task_of(mlp()))  # forward flops per example: 1.8 x p
    assert directional_pays(model, 5)
    assert not directional_pays(model, directional.MAX_VECTORS + 1)
    assert not directional_pays(tracked(task_of(mlp()), model_mode="train"), 5)  # dropout draws per example
    conv = torch.nn.Sequential(torch.nn.Unflatten(1, (1, 8, 8)), torch.nn.Conv2d(1, 16, 3, padding=1), torch.nn.ReLU(),
                               torch.nn.Conv2d(16, 16, 3, padding=1), torch.nn.ReLU(), torch.nn.Flatten(),
                               torch.nn.Linear(1024, 10)).double()
    net = tracked(task_of(conv, n_train=8, features=64))  # forward flops per example: 26 x p
    assert directional_pays(net, 1)
    assert not directional_pays(net, 2)
