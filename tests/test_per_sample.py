"""Models that vmap cannot trace: per-sample hooks (or the loop) give the gradients and scores of a twin
that vmap can trace; the path taken is recorded, and hooks that would be wrong are refused."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import TensorDataset

import influence_store as ist
from influence_store.gradients import TrackedModel
from tasks import ce_loss


class Untraceable(torch.nn.Module):
    """An MLP whose forward reads a Python number and assigns through a boolean mask (vmap refuses both);
    with ``conv`` its first layer is a Conv1d over the features."""

    def __init__(self, hidden: int = 6, conv: bool = False) -> None:
        super().__init__()
        self.hidden = torch.nn.Conv1d(1, 2, kernel_size=3) if conv else torch.nn.Linear(5, hidden)
        self.out = torch.nn.Linear(6 if conv else hidden, 3)

    def features(self, x):
        return self.hidden(x.unsqueeze(1)).flatten(1) if isinstance(self.hidden, torch.nn.Conv1d) else self.hidden(x)

    def forward(self, x):
        h = torch.tanh(self.features(x))
        h = h.clone()
        h[h.abs() < 0.05] = 0.0
        if float(x.abs().max().item()) > 1e6:  # never true: only here to call .item()
            h = h / 2
        return self.out(h)


class Twin(Untraceable):
    """The same function written so that vmap can trace it."""

    def forward(self, x):
        h = torch.tanh(self.features(x))
        return self.out(torch.where(h.abs() < 0.05, torch.zeros_like(h), h))


def twin_tasks(n_train=40, n_test=10, conv=False):
    torch.manual_seed(0)
    x = torch.randn(n_train + n_test, 5, dtype=torch.float64)
    y = torch.randint(0, 3, (n_train + n_test,))
    untraceable = Untraceable(conv=conv).double()
    twin = Twin(conv=conv).double()
    twin.load_state_dict(untraceable.state_dict())
    train, test = TensorDataset(x[:n_train], y[:n_train]), TensorDataset(x[n_train:], y[n_train:])
    return ist.Task(untraceable, ce_loss, train, test, l2=0.01), ist.Task(twin, ce_loss, train, test, l2=0.01)


@pytest.mark.parametrize("approximator, options", [
    ("exact", {"damping": 0.01}),
    ("lissa", {"batch_size": 16, "scale": 10.0, "depth_iters": 20}),
])
@pytest.mark.parametrize("conv", [False, True])
def test_untraceable_model_scores_like_its_vmappable_twin(approximator, options, conv):
    """Linear layers only: both take per-sample hooks first, vmap is never tried. With a Conv1d the twin takes
    vmap and the untraceable model falls back to hooks (convolutions included)."""
    untraceable, twin = twin_tasks(conv=conv)
    ours = ist.compute_scores(untraceable, approximator, options)
    expected = ist.compute_scores(twin, approximator, options)
    torch.testing.assert_close(ours.matrix(), expected.matrix(), rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(ours.self_influence(), expected.self_influence(), rtol=1e-9, atol=1e-12)
    path = ours.diagnostics["grad_path"]
    if conv:
        assert expected.diagnostics["grad_path"]["path"] == "vmap"
        assert path["path"] == "hooks" and "vmap cannot trace" in path["why"], path
        assert any("per-sample hooks" in note for note in ours.diagnostics["grad_notes"])
    else:
        assert path == expected.diagnostics["grad_path"] and path["path"] == "hooks" and "faster" in path["why"]
        assert ours.diagnostics["grad_notes"] == []


class Layers(torch.nn.Module):
    """Embedding (with a padding row), Conv1d, Conv2d and a Linear over a sequence, plus an .item() call."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(9, 4, padding_idx=0)
        self.conv1 = torch.nn.Conv1d(4, 3, kernel_size=3, padding=1, stride=2, dilation=1)
        self.conv2 = torch.nn.Conv2d(1, 2, kernel_size=(2, 2), padding=1, dilation=(1, 2))
        self.token = torch.nn.Linear(4, 2)
        self.out = torch.nn.Linear(3 + 2 + 2, 2)

    def forward(self, tokens):
        e = self.embed(tokens)                                      # [m, T, 4]
        if int(tokens.max().item()) < 0:
            e = -e
        a = self.conv1(e.transpose(1, 2)).amax(2)                   # [m, 3]
        b = self.conv2(e.unsqueeze(1)).mean((2, 3))                 # [m, 2]
        c = torch.tanh(self.token(e)).mean(1)                       # [m, 2]: a Linear over [m, T, 4]
        return self.out(torch.cat([a, b, c], 1))


def test_hooks_cover_embedding_conv_and_linear_layers():
    torch.manual_seed(1)
    tokens = torch.randint(0, 9, (30, 7))
    tokens[:, 5:] = 0  # padding
    y = torch.randint(0, 2, (30,))
    data = TensorDataset(tokens, y)
    task = ist.Task(Layers().double(), ce_loss, data, data)
    tracked = TrackedModel(task, [n for n, _ in task.model.named_parameters()])
    grads = tracked.per_example_grads("train", range(30))
    assert tracked.grad_strategy == "hooks", tracked.notes
    loop = torch.stack([tracked._single_grad(tracked.batch("train", [i])) for i in range(30)])
    torch.testing.assert_close(grads, loop, rtol=1e-10, atol=1e-12)
    padding_row = slice(0, 4)  # embed.weight[0]: the padding row never gets a gradient
    assert torch.equal(grads[:, padding_row], torch.zeros(30, 4, dtype=torch.float64))


class Scaled(Untraceable):
    """A bare parameter used directly in forward: no per-sample rule owns it."""

    def __init__(self) -> None:
        super().__init__()
        self.temperature = torch.nn.Parameter(torch.tensor(1.5))

    def forward(self, x):
        return super().forward(x) * self.temperature


def centered_loss(model, batch):
    """Examples interact: each logit is centred on the batch mean (so hooks' per-sample rule does not hold)."""
    x, y = batch
    logits = model(x)
    if len(x) > 1:
        logits = logits - logits.mean(0, keepdim=True)
    return torch.nn.functional.cross_entropy(logits, y, reduction="none")


@pytest.mark.parametrize("model, loss, why", [
    (Scaled, ce_loss, "no per-sample rule"),
    (Untraceable, centered_loss, "disagreed with autograd"),
])
def test_loop_when_hooks_do_not_apply_or_disagree(model, loss, why):
    torch.manual_seed(2)
    x, y = torch.randn(8, 5, dtype=torch.float64), torch.randint(0, 3, (8,))
    task = ist.Task(model().double(), loss, TensorDataset(x, y), TensorDataset(x, y))
    tracked = TrackedModel(task, [n for n, _ in task.model.named_parameters()])
    grads = tracked.per_example_grads("train", range(8))
    assert tracked.grad_strategy == "loop" and why in tracked.grad_path["why"], tracked.grad_path
    loop = torch.stack([tracked._single_grad(tracked.batch("train", [i])) for i in range(8)])
    torch.testing.assert_close(grads, loop, rtol=0, atol=0)


def test_gradients_are_taken_even_under_no_grad():
    """The score path calls per_example_grads from code that may run under torch.no_grad()."""
    untraceable, twin = twin_tasks()
    for task in (untraceable, twin):
        tracked = TrackedModel(task, [n for n, _ in task.model.named_parameters()])
        with torch.no_grad():
            grads = tracked.per_example_grads("test", range(4))
        assert grads.abs().sum() > 0


class Dropped(Twin):
    def __init__(self) -> None:
        super().__init__()
        self.drop = torch.nn.Dropout(0.5)

    def forward(self, x):
        return self.out(self.drop(torch.tanh(self.hidden(x))))


def test_model_mode_is_part_of_a_runs_identity(tmp_path):
    """eval and train are two runs; train again (same seed) is the stored run; resume keeps the mode;
    the run records the gradient path, and load time apart from compute time."""
    from influence_store.runs import execute_run
    from influence_store.store import Store

    torch.manual_seed(3)
    x, y = torch.randn(12, 5, dtype=torch.float64), torch.randint(0, 3, (12,))
    task = ist.Task(Dropped().double(), ce_loss, TensorDataset(x, y), TensorDataset(x[:4], y[:4]), l2=0.01)
    store = Store(str(tmp_path / "modes.db"))
    options = {"depth_iters": 3, "scale": 10.0}
    evaluated = execute_run(store, task, options=options, self_influence=False)
    trained = execute_run(store, task, options=options, self_influence=False, model_mode="train")
    again = execute_run(store, task, options=options, self_influence=False, model_mode="train")
    assert trained.run_id != evaluated.run_id and again.run_id == trained.run_id and again.outcome == "existing"
    assert execute_run(store, task, resume=trained.run_id).run_id == trained.run_id
    run = store.run(trained.run_id)
    assert run["settings"]["model_mode"] == "train" and run["settings"]["requested"]["model_mode"] == "train"
    assert run["diagnostics"]["grad_path"]["path"] == "hooks"  # linear layers (dropout has no parameters)
    assert run["diagnostics"]["seconds_load"] >= 0 and run["diagnostics"]["seconds_compute"] > 0
    test_id = store.example_ids(trained.run_id, "test")[0]
    train_scores = dict(store.score_rows(trained.run_id, test_id))
    eval_scores = dict(store.score_rows(evaluated.run_id, test_id))
    assert any(abs(train_scores[k] - eval_scores[k]) > 1e-6 for k in train_scores)  # dropout was on


class Tied(torch.nn.Module):
    """The output layer reuses the embedding's weight: a hook sees only one of its two uses."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(10, 4)
        self.mid = torch.nn.Linear(4, 4)
        self.out = torch.nn.Linear(4, 10, bias=False)
        self.out.weight = self.embed.weight

    def forward(self, tokens):
        return self.out(torch.tanh(self.mid(self.embed(tokens).mean(1))))


def test_a_shared_weight_sends_the_model_from_hooks_to_vmap():
    torch.manual_seed(4)
    tokens, y = torch.randint(0, 10, (8, 5)), torch.randint(0, 10, (8,))
    task = ist.Task(Tied().double(), ce_loss, TensorDataset(tokens, y), TensorDataset(tokens, y))
    tracked = TrackedModel(task, [n for n, _ in task.model.named_parameters()])
    grads = tracked.per_example_grads("train", range(8))
    assert tracked.grad_strategy == "vmap" and "disagreed with autograd" in tracked.grad_path["why"]
    loop = torch.stack([tracked._single_grad(tracked.batch("train", [i])) for i in range(8)])
    torch.testing.assert_close(grads, loop, rtol=1e-10, atol=1e-12)
