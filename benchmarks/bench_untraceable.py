"""Models vmap cannot trace against their vmappable twins: the same scores, and what the second path costs.

    .venv/bin/python benchmarks/bench_untraceable.py              # 3 interleaved rounds, minima
    .venv/bin/python benchmarks/bench_untraceable.py --rounds 1 --approximators lissa

Each model is written twice: once as torch.func can trace it, once with a forward that calls ``.item()`` and
assigns through a boolean mask (vmap refuses both), with the same weights, so both compute the same
function. The untraceable one takes influence-store's second gradient path (per-sample hooks on Linear and
Conv2d layers, double-backward HVPs on whole batches). Timed: the full computation of a run (losses, the
approximator's setup, every score and the self-influence, ``compute_scores(...).matrix()`` and
``.self_influence()``), on sklearn's digits (1,437 train x 360 test), 2 threads. Printed: each side's time,
the ratio (goal: at most 3x), the gradient path taken, and the largest score difference relative to the
largest score.
"""

from __future__ import annotations

import argparse
import time

import torch
from sklearn.datasets import load_digits
from torch.utils.data import TensorDataset

import influence_store as ist


def ce(model, batch):
    x, y = batch
    return torch.nn.functional.cross_entropy(model(x), y, reduction="none")


class MLP(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.hidden = torch.nn.Linear(64, 32)
        self.out = torch.nn.Linear(32, 10)

    def hidden_units(self, x):
        return torch.tanh(self.hidden(x))

    def forward(self, x):
        return self.out(self.hidden_units(x))


class UntraceableMLP(MLP):
    def forward(self, x):
        h = self.hidden_units(x).clone()
        h[h.abs() > 1e3] = 0.0  # boolean-mask assignment (never true for tanh: the same function)
        if float(x.abs().max().item()) > 1e6:  # .item(): data-dependent control flow
            h = h / 2
        return self.out(h)


class CNN(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 8, 3)
        self.out = torch.nn.Linear(8 * 6 * 6, 10)

    def features(self, x):
        return torch.tanh(self.conv(x.view(-1, 1, 8, 8))).flatten(1)

    def forward(self, x):
        return self.out(self.features(x))


class UntraceableCNN(CNN):
    def forward(self, x):
        h = self.features(x).clone()
        h[h.abs() > 1e3] = 0.0
        if float(x.abs().max().item()) > 1e6:
            h = h / 2
        return self.out(h)


MODELS = {"mlp": (MLP, UntraceableMLP), "cnn": (CNN, UntraceableCNN)}
APPROXIMATORS = {"lissa": {}, "exact": {"damping": 0.01}}


def tasks(name: str):
    """The trained twin and its untraceable copy (same weights), as two Tasks on the same data."""
    traceable, untraceable = MODELS[name]
    x, y = load_digits(return_X_y=True)
    x, y = torch.tensor(x / 16.0, dtype=torch.float32), torch.tensor(y)
    n = 1437
    torch.manual_seed(0)
    model = traceable()
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    for _ in range(300):
        optimizer.zero_grad()
        ce(model, (x[:n], y[:n])).mean().backward()
        optimizer.step()
    copy = untraceable()
    copy.load_state_dict(model.state_dict())
    train, test = TensorDataset(x[:n], y[:n]), TensorDataset(x[n:], y[n:])
    return ist.Task(model.eval(), ce, train, test, l2=0.0), ist.Task(copy.eval(), ce, train, test, l2=0.0)


def full_run(task, approximator: str):
    started = time.perf_counter()
    computation = ist.compute_scores(task, approximator, APPROXIMATORS[approximator])
    scores = torch.cat([computation.matrix(), computation.self_influence()[None]])
    return time.perf_counter() - started, scores, computation.diagnostics["grad_path"]["path"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--approximators", nargs="+", default=list(APPROXIMATORS), choices=list(APPROXIMATORS))
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(2)
    print(f"digits, 1,437 train x 360 test, every score and the self-influence; minima of {args.rounds} "
          f"interleaved rounds")
    for name in args.models:
        twin, untraceable = tasks(name)
        params = sum(p.numel() for p in twin.model.parameters())
        for approximator in args.approximators:
            times = {"twin": [], "untraceable": []}
            for _ in range(args.rounds):
                seconds, expected, twin_path = full_run(twin, approximator)
                times["twin"].append(seconds)
                seconds, scores, path = full_run(untraceable, approximator)
                times["untraceable"].append(seconds)
            error = float((scores - expected).abs().max() / expected.abs().max())
            fast, slow = min(times["twin"]), min(times["untraceable"])
            print(f"{name:4s} (p={params:,}) {approximator:6s} twin ({twin_path}) {fast:6.2f} s   untraceable "
                  f"({path}) {slow:6.2f} s   ratio {slow / fast:4.2f}x   max error {error:.1e} of the largest score")


if __name__ == "__main__":
    main()
