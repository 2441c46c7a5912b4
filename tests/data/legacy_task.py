"""The task behind ``store_before_run_settings.db``: a seeded, untrained softmax layer on digits, so its
weights (part of every run's identity) are the same bytes on every machine."""

import torch
from sklearn.datasets import load_digits
from torch.utils.data import TensorDataset

import influence_store as ist


def loss(model, batch):
    x, y = batch
    return torch.nn.functional.cross_entropy(model(x), y, reduction="none")


def task() -> ist.Task:
    x, y = load_digits(return_X_y=True)
    x, y = torch.tensor(x / 16.0, dtype=torch.float64), torch.tensor(y)
    torch.manual_seed(0)
    model = torch.nn.Linear(64, 10).double()
    return ist.Task(model, loss, TensorDataset(x[:80], y[:80]), TensorDataset(x[80:100], y[80:100]), l2=1e-2)
