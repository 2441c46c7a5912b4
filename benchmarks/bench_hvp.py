"""HVP strategies side by side: reverse-over-reverse (what influence-store uses where torch.func traces the
model), forward-over-reverse (what it used before) and double backward (its fallback), one HVP call on the
same vectors and batch.

    .venv/bin/python benchmarks/bench_hvp.py                                  # OpenMP's default waiting
    OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/bench_hvp.py          # what bench_peers.py sets

Models: the digits tanh MLP of bench_peers.py (p=2,410) and its 112k-parameter variant, a small CNN and an
embedding model on random data; each on an 8-example batch (a LiSSA step) and on its whole training set
(CG, exact, power iteration). Best of 3 after a warm-up, 2 threads; the three results agree to float32
rounding (relative difference of the norms under 1e-4).

A second table times ``TrackedModel.hvp`` over the whole training set as an iterative solver calls it (CG
with 10 vectors, exact's identity sweep): pieces sized to stay in cache (``CPU_PIECE_BYTES``) and the
graphs kept from the second call on, against one piece per call with the graph rebuilt each time (what
it did before). Best of 3 after 2 calls; both give the same products to float32 rounding.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch
from torch.utils.data import TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_peers  # noqa: E402

import influence_store as ist  # noqa: E402
from influence_store.freezing import tracked_parameters  # noqa: E402
from influence_store.gradients import TrackedModel  # noqa: E402


def forward_over_reverse(tracked, vectors, batch):
    """``jvp`` of ``grad``, vmapped over the vectors: the strategy influence-store used until reverse-over-reverse
    measured faster on every model here."""
    from torch.func import grad, jvp, vmap

    gradient = grad(lambda flat: tracked._losses(flat, batch).sum())
    flat = tracked.flat.detach()
    return vmap(lambda tangent: jvp(gradient, (flat,), (tangent,))[1])(vectors).detach()


def cnn():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 16, 3), torch.nn.ReLU(), torch.nn.Conv2d(16, 32, 3),
                                torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(32 * 4 * 4, 10))
    x, y = torch.randn(512, 1, 8, 8), torch.randint(0, 10, (512,))
    return model, x, y


class Embedding(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embedding = torch.nn.Embedding(1000, 64)
        self.out = torch.nn.Linear(64, 2)

    def forward(self, tokens):
        return self.out(torch.tanh(self.embedding(tokens).mean(1)))


def embedding():
    torch.manual_seed(0)
    return Embedding(), torch.randint(0, 1000, (512, 20)), torch.randint(0, 2, (512,))


def digits(hidden):
    model, x, y, _, _ = bench_peers.digits(hidden)
    return model, x, y


def best(call, rounds: int = 3) -> float:
    call()
    times = []
    for _ in range(rounds):
        started = time.perf_counter()
        call()
        times.append(time.perf_counter() - started)
    return min(times)


def main() -> None:
    torch.set_num_threads(2)
    cases = [("digits MLP", lambda: digits(32)), ("112k MLP", lambda: digits(1336)), ("CNN", cnn),
             ("embedding", embedding)]
    print("model        batch    p        vectors  double backward  forward-over-reverse  reverse-over-reverse"
          "  fwd/rev ratio")
    for name, build in cases:
        model, x, y = build()
        task = ist.Task(model, bench_peers.ce, TensorDataset(x, y), TensorDataset(x[:1], y[:1]))
        tracked = TrackedModel(task, tracked_parameters(model, "all", {}))
        for size in (8, len(x)):
            vectors = torch.randn(50 if size == 8 else 10, tracked.num_params)
            batch = tracked.batch("train", list(range(size)))
            backward = tracked._backward_products(batch)(vectors).detach()
            for other in (forward_over_reverse(tracked, vectors, batch), tracked._products(batch)(vectors).detach()):
                assert float((other - backward).norm()) <= 1e-4 * float(backward.norm()), name  # float32 rounding
            slow = best(lambda: tracked._backward_products(batch)(vectors).detach())
            forward = best(lambda: forward_over_reverse(tracked, vectors, batch))
            reverse = best(lambda: tracked._products(batch)(vectors).detach())
            print(f"{name:12s} {size:5d} {tracked.num_params:8,d} {len(vectors):7d}  {slow:14.4f} s"
                  f"  {forward:18.4f} s  {reverse:18.4f} s  {forward / reverse:5.2f}x")


def whole_set_products() -> None:
    """``TrackedModel.hvp`` as shipped against one piece with its graph rebuilt per call (the old way)."""
    import influence_store.gradients as gradients

    shipped = gradients.CPU_PIECE_BYTES
    print("\nwhole-set HVP   p        vectors  one piece, rebuilt  cache-sized pieces, kept graphs  ratio")
    for name, build, k in [("digits MLP", lambda: digits(32), None), ("112k MLP", lambda: digits(1336), 10),
                           ("small CNN", cnn, 10), ("embedding", embedding, 10)]:
        model, x, y = build()
        task = ist.Task(model, bench_peers.ce, TensorDataset(x, y), TensorDataset(x[:1], y[:1]))
        times = {}
        for label, piece_bytes in (("old", 2**62), ("new", shipped)):
            gradients.CPU_PIECE_BYTES = piece_bytes
            tracked = TrackedModel(task, tracked_parameters(model, "all", {}))
            vectors = torch.eye(tracked.num_params) if k is None else torch.randn(k, tracked.num_params)
            if label == "old":
                tracked._graphs_fit = lambda: False
            times[label] = best(lambda: tracked.hvp(vectors))
        gradients.CPU_PIECE_BYTES = shipped
        print(f"{name:12s} {tracked.num_params:8,d} {len(vectors):7d}  {times['old']:16.4f} s"
              f"  {times['new']:29.4f} s  {times['old'] / times['new']:5.2f}x")


if __name__ == "__main__":
    main()
    whole_set_products()
