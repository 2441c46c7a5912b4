"""Scoring k vectors against the training set: flat per-example gradients + GEMM vs forward-mode derivatives.

    .venv/bin/python benchmarks/bench_directional.py [--rounds 5]

For each model and k, both ways of computing ``vectors @ g_i`` for every training example are timed side by
side (interleaved rounds, minima, 2 threads), whichever one ``directional_pays`` would choose; the table shows
its choice, so the rule can be checked against the clock. The scores agree to float32 rounding.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402
from torch import nn  # noqa: E402
from torch.utils.data import TensorDataset  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import influence_store as ist  # noqa: E402
from bench_peers import ce, digits  # noqa: E402
from influence_store.directional import DirectionalDots, directional_pays, forward_flops  # noqa: E402
from influence_store.gradients import TrackedModel  # noqa: E402


class Bag(nn.Module):
    """Mean of 20 token embeddings (5,000 x 32) and a linear layer: an embedding model's shape."""

    def __init__(self) -> None:
        super().__init__()
        self.embedding, self.linear = nn.Embedding(5000, 32), nn.Linear(32, 2)

    def forward(self, tokens):
        return self.linear(self.embedding(tokens).mean(1))


def models():
    torch.manual_seed(0)
    mlp100k, x, y, _, _ = digits(1336)
    mlp2k = digits(32)[0]
    cnn = nn.Sequential(nn.Unflatten(1, (1, 8, 8)), nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(),
                        nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(1024, 10))
    tokens, labels = torch.randint(0, 5000, (1000, 20)), torch.randint(0, 2, (1000,))
    return {"MLP 100k (digits)": (mlp100k, x, y), "MLP 2.4k (digits)": (mlp2k, x, y),
            "CNN 12.7k (digits)": (cnn, x, y), "embedding bag 160k": (Bag(), tokens, labels)}


def flat_dots(model: TrackedModel, vectors):
    return torch.cat([(vectors.to(g.dtype) @ g.T).double() for _, g in model.grad_chunks("train")], dim=1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} threads, minimum of {args.rounds} interleaved rounds\n")
    print("| model | n_train | k | forward flops / p | rule chooses | gradients + GEMM s | forward mode s | "
          "gradients / forward mode | max rel. difference |")
    print("| --- | ---: | ---: | ---: | --- | ---: | ---: | ---: | ---: |")
    for name, (net, x, y) in models().items():
        task = ist.Task(net, ce, TensorDataset(x, y), TensorDataset(x[:1], y[:1]))
        model = TrackedModel(task, [n for n, _ in net.named_parameters()])
        ratio = forward_flops(model) / model.num_params
        for k in (1, 10, 50):
            vectors = torch.randn(k, model.num_params, generator=torch.Generator().manual_seed(k))
            directional = DirectionalDots(model)
            a, b = flat_dots(model, vectors), directional(vectors, range(len(x)))
            difference = float((a - b).abs().max() / a.abs().max())
            times = {"flat": [], "directional": []}
            for _ in range(args.rounds):
                started = time.perf_counter()
                flat_dots(model, vectors)
                times["flat"].append(time.perf_counter() - started)
                started = time.perf_counter()
                directional(vectors, range(len(x)))
                times["directional"].append(time.perf_counter() - started)
            flat, forward = min(times["flat"]), min(times["directional"])
            choice = "forward mode" if directional_pays(model, k) else "gradients"
            print(f"| {name} | {len(x):,} | {k} | {ratio:.1f} | {choice} | {flat:.3f} | {forward:.3f} | "
                  f"{flat / forward:.2f} | {difference:.1e} |", flush=True)


if __name__ == "__main__":
    main()
