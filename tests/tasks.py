"""Small real tasks shared by the tests (also usable as CLI task specs: tests/tasks.py:NAME)."""

from __future__ import annotations

import torch
from sklearn.datasets import load_breast_cancer, load_digits
from sklearn.preprocessing import StandardScaler
from torch.utils.data import TensorDataset

import influence_store as ist

L2 = 0.01


def bce_loss(model, batch):
    x, y = batch
    return torch.nn.functional.binary_cross_entropy_with_logits(model(x).squeeze(-1), y, reduction="none")


def ce_loss(model, batch):
    x, y = batch
    return torch.nn.functional.cross_entropy(model(x), y, reduction="none")


def fit_logistic(x: torch.Tensor, y: torch.Tensor, l2: float = L2, init: torch.nn.Module | None = None,
                 grad_tol: float = 1e-10) -> torch.nn.Linear:
    """L2 logistic regression trained with Newton's method to gradient norm < grad_tol (float64)."""
    model = torch.nn.Linear(x.shape[1], 1).double()
    if init is not None:
        model.load_state_dict(init.state_dict())
    else:  # start at zero: the same weights in every process, so a stored run is found again by its weights
        torch.nn.init.zeros_(model.weight)
        torch.nn.init.zeros_(model.bias)
    theta = torch.cat([model.weight.detach().reshape(-1), model.bias.detach()]).clone()
    xb = torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], dim=1)
    for _ in range(100):
        p = torch.sigmoid(xb @ theta)
        g = xb.T @ (p - y) / len(y) + l2 * theta
        if g.norm() < grad_tol:
            break
        h = (xb.T * (p * (1 - p))) @ xb / len(y) + l2 * torch.eye(len(theta), dtype=x.dtype)
        theta = theta - torch.linalg.solve(h, g)
    with torch.no_grad():
        model.weight.copy_(theta[:-1].reshape(1, -1))
        model.bias.copy_(theta[-1:])
    return model


def breast_cancer_data(n_train: int = 455):
    x, y = load_breast_cancer(return_X_y=True)
    x = torch.tensor(StandardScaler().fit_transform(x), dtype=torch.float64)
    y = torch.tensor(y, dtype=torch.float64)
    return x[:n_train], y[:n_train], x[n_train:], y[n_train:]


def breast_cancer_task(n_train: int = 455, l2: float = L2) -> ist.Task:
    """L2 logistic regression on breast_cancer, trained to a tight optimum (31 parameters)."""
    xtr, ytr, xte, yte = breast_cancer_data(n_train)
    model = fit_logistic(xtr, ytr, l2)
    return ist.Task(model, bce_loss, TensorDataset(xtr, ytr), TensorDataset(xte, yte), l2=l2,
                    fit=lambda examples: fit_logistic(*[torch.stack(t) for t in zip(*examples)], l2=l2))


def breast_cancer_200_by_60() -> ist.Task:
    """200 training and 60 test examples, float64 logistic regression."""
    task = breast_cancer_task(n_train=200)
    task.test = torch.utils.data.TensorDataset(*(t[:60] for t in task.test.tensors))
    return task


def small_breast_cancer_task() -> ist.Task:
    """A quicker variant for CLI tests: 120 training and 30 test examples."""
    task = breast_cancer_task(n_train=120)
    task.test = torch.utils.data.Subset(task.test, range(30))
    return task


class DigitsMLP(torch.nn.Module):
    def __init__(self, hidden: int = 32) -> None:
        super().__init__()
        self.hidden = torch.nn.Linear(64, hidden)
        self.out = torch.nn.Linear(hidden, 10)

    def forward(self, x):
        return self.out(torch.tanh(self.hidden(x)))


def digits_mlp_task(n_train: int = 600, n_test: int = 100, epochs: int = 200, seed: int = 0) -> ist.Task:
    """A small non-convex model: a tanh MLP on digits, trained briefly with Adam (float32)."""
    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x / 16.0, dtype=torch.float32)
    y = torch.tensor(y, dtype=torch.long)
    torch.manual_seed(seed)
    model = DigitsMLP()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(epochs):
        optimizer.zero_grad()
        ce_loss(model, (x[:n_train], y[:n_train])).mean().backward()
        optimizer.step()
    return ist.Task(model, ce_loss, TensorDataset(x[:n_train], y[:n_train]),
                    TensorDataset(x[n_train:n_train + n_test], y[n_train:n_train + n_test]), l2=1e-3)
