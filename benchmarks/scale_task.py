"""The task bench_scale.py shares between processes: a digits MLP (64-32-10, 2,410 parameters).

Trained in a second with full-batch Adam from a fixed seed, so every process loads the same weights
(the same run identity) without spending the benchmark's time on training.
"""

import torch
from sklearn.datasets import load_digits
from torch.utils.data import TensorDataset

import influence_store as ist


def loss(model, batch):
    x, y = batch
    return torch.nn.functional.cross_entropy(model(x), y, reduction="none")


def task(n_train="1200", n_test="160"):
    n_train, n_test = int(n_train), int(n_test)
    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x / 16.0, dtype=torch.float64)
    y = torch.tensor(y)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.Tanh(), torch.nn.Linear(32, 10)).double()
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    for _ in range(200):
        optimizer.zero_grad()
        loss(model, (x[:n_train], y[:n_train])).mean().backward()
        optimizer.step()
    train = TensorDataset(x[:n_train], y[:n_train])
    test = TensorDataset(x[n_train:n_train + n_test], y[n_train:n_train + n_test])
    return ist.Task(model, loss, train, test, l2=0.0, name="digits-mlp-scale")
