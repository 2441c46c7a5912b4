"""HVP strategies and per-example gradient paths side by side, on the same vectors, batches and models.

    .venv/bin/python benchmarks/bench_hvp.py                                  # OpenMP's default waiting
    OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/bench_hvp.py          # what bench_peers.py sets

HVPs (first table), one call each, graph built and applied: double backward with the vectors vmapped by
torch.func over the second backward pass (what influence-store ships for a LiSSA batch), reverse-over-reverse
(``vjp`` of ``grad``, vmapped over the vectors: what it ships for the whole training set), forward-over-reverse
(what it shipped before) and autograd's ``is_grads_batched`` (its old fallback for models torch.func cannot
trace); the last column is the shipped strategy's time over the best other's. Per-example gradients (second
table), one chunk: per-sample hooks (``per_sample.py``) against ``vmap(grad)``; ``TrackedModel`` takes hooks
first where every tracked parameter is in a linear or embedding layer.

Models: the digits tanh MLP of bench_peers.py (p=2,410) and its 112k-parameter variant, a small CNN and an
embedding model on random data; each on an 8-example batch (a LiSSA step) and on its whole training set
(CG, exact, power iteration). Best of 10 (HVPs) or 3 after a warm-up, 2 threads; the results agree to float32 rounding
(relative difference of the norms under 1e-4).

A third table times ``TrackedModel.hvp`` over the whole training set as an iterative solver calls it (CG
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
    """``jvp`` of ``grad``, vmapped over the vectors."""
    from torch.func import grad, jvp, vmap

    gradient = grad(lambda flat: tracked._losses(flat, batch).sum())
    flat = tracked.flat.detach()
    return vmap(lambda tangent: jvp(gradient, (flat,), (tangent,))[1])(vectors).detach()


def reverse_over_reverse(tracked, vectors, batch):
    """The pullback of ``grad`` (``vjp``), built once and vmapped over the vectors."""
    from torch.func import grad, vjp, vmap

    _, pullback = vjp(grad(lambda flat: tracked._losses(flat, batch).sum()), tracked.flat.detach())
    return vmap(lambda cotangent: pullback(cotangent)[0])(vectors).detach()


def grads_batched(tracked, vectors, batch):
    """Double backward with autograd's own ``is_grads_batched`` (its legacy vmap)."""
    flat = tracked.flat.detach().requires_grad_(True)
    (g,) = torch.autograd.grad(tracked._losses(flat, batch).sum(), flat, create_graph=True)
    return torch.autograd.grad(g, flat, grad_outputs=vectors, is_grads_batched=True)[0].detach()


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


CASES = [("digits MLP", lambda: digits(32)), ("112k MLP", lambda: digits(1336)), ("CNN", cnn), ("embedding", embedding)]


def main() -> None:
    torch.set_num_threads(2)
    print("HVPs, seconds per call (shipped: double backward for a LiSSA batch, reverse-over-reverse for the whole set)")
    print("model        batch    p        vectors  double backward  reverse-over-reverse  forward-over-reverse"
          "  is_grads_batched  shipped vs the best other")
    for name, build in CASES:
        model, x, y = build()
        task = ist.Task(model, bench_peers.ce, TensorDataset(x, y), TensorDataset(x[:1], y[:1]))
        tracked = TrackedModel(task, tracked_parameters(model, "all", {}))
        for size in (8, len(x)):
            vectors = torch.randn(50 if size == 8 else 10, tracked.num_params)
            batch = tracked.batch("train", list(range(size)))
            ways = {"double backward": lambda: tracked._products(batch, "double-backward")(vectors).detach(),
                    "reverse-over-reverse": lambda: tracked._products(batch, "reverse-over-reverse")(vectors).detach(),
                    "forward-over-reverse": lambda: forward_over_reverse(tracked, vectors, batch),
                    "is_grads_batched": lambda: grads_batched(tracked, vectors, batch)}
            reference = ways["double backward"]()
            for way in ways.values():
                assert float((way() - reference).norm()) <= 1e-4 * float(reference.norm()), name  # float32 rounding
            times = {label: best(way, rounds=10) for label, way in ways.items()}
            shipped = "reverse-over-reverse" if size == len(x) else "double backward"
            others = min(t for label, t in times.items() if label != shipped)
            print(f"{name:12s} {size:5d} {tracked.num_params:8,d} {len(vectors):7d}"
                  + "".join(f"  {t:{len(label)}.4f}" for label, t in times.items())
                  + f"  {times[shipped] / others:5.2f}x")


def per_example_gradients() -> None:
    """Per-sample hooks against ``vmap(grad)`` on one chunk of examples, and the path ``TrackedModel`` takes."""
    torch.set_num_threads(2)
    print("\nper-example gradients: hooks' time / vmap(grad)'s time")
    print("model        examples  p        vmap(grad)  hooks        ratio   path taken")
    for name, build in CASES:
        model, x, y = build()
        task = ist.Task(model, bench_peers.ce, TensorDataset(x, y), TensorDataset(x[:1], y[:1]))
        tracked = TrackedModel(task, tracked_parameters(model, "all", {}))
        from influence_store.per_sample import plan

        tracked._hook_plan = plan(model, tracked.names)
        for size in (8, 200):
            batch = tracked.batch("train", list(range(size)))
            with torch.enable_grad():
                hooks, vmapped = tracked._hook_grads(batch, size), tracked._vmap_grads(batch)
                assert float((hooks - vmapped).norm()) <= 1e-4 * float(vmapped.norm()), name
                vmap_time = best(lambda: tracked._vmap_grads(batch))
                hook_time = best(lambda: tracked._hook_grads(batch, size))
            path = TrackedModel(task, tracked.names).grad_path["path"]
            print(f"{name:12s} {size:8d} {tracked.num_params:8,d}  {vmap_time:8.4f} s  {hook_time:8.4f} s"
                  f"  {hook_time / vmap_time:6.2f}x  {path}")


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
    per_example_gradients()
    whole_set_products()
