"""A larger task for the engine benchmark: 20,000 train x 500 test, a 30,154-parameter tanh MLP.

    influence-store run benchmarks/large_lissa_task.py:task -a lissa --no-self-influence

Synthetic 50-feature, 10-class data from sklearn's ``make_classification`` (fixed seed), an MLP
50 -> 256 -> 64 -> 10 with tanh, trained briefly with full-batch Adam (seeded, so every process gets
the same weights and a stored run is found again). LiSSA's defaults then run ceil(0.25 * 2,500) = 625
steps of 8-example HVPs.
"""

from __future__ import annotations

import torch
from torch.utils.data import TensorDataset

import influence_store as ist

N_TRAIN, N_TEST = 20_000, 500


def ce_loss(model, batch):
    x, y = batch
    return torch.nn.functional.cross_entropy(model(x), y, reduction="none")


def data(seed: int = 0):
    from sklearn.datasets import make_classification

    x, y = make_classification(n_samples=N_TRAIN + N_TEST, n_features=50, n_informative=30, n_redundant=10,
                               n_classes=10, n_clusters_per_class=1, random_state=seed)
    x = torch.tensor((x - x.mean(0)) / x.std(0), dtype=torch.float32)
    return x, torch.tensor(y, dtype=torch.long)


def model_for(x: torch.Tensor, y: torch.Tensor, epochs: int = 60, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(50, 256), torch.nn.Tanh(), torch.nn.Linear(256, 64), torch.nn.Tanh(),
                                torch.nn.Linear(64, 10))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(epochs):
        optimizer.zero_grad()
        ce_loss(model, (x, y)).mean().backward()
        optimizer.step()
    return model.eval()


def task() -> ist.Task:
    x, y = data()
    model = model_for(x[:N_TRAIN], y[:N_TRAIN])
    return ist.Task(model, ce_loss, TensorDataset(x[:N_TRAIN], y[:N_TRAIN]), TensorDataset(x[N_TRAIN:], y[N_TRAIN:]),
                    name="make-classification-20k")
