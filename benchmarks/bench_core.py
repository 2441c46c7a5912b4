"""Core engine benchmark: what vectorizing buys over the per-example loops of AllenNLP's SimpleInfluence.

    .venv/bin/python benchmarks/bench_core.py            # about 2 minutes on one CPU core
    .venv/bin/python benchmarks/bench_core.py --quick    # smaller sizes, a smoke test

Prints three measurements, each a ratio of two timings (or memory figures) taken in the same run; a
timing is the best of a few repeats, so load from other processes disturbs it least. Everything runs on
one thread by default (``--threads N`` to change): the speed-ups then come from vectorization alone, not
from cores the per-example loops cannot use, and they do not swing with other load on a shared machine:

1. Per-example gradients of a digits MLP (2,410 parameters): ``vmap(grad)`` in memory-budgeted chunks
   (``TrackedModel.grad_chunks``) against a loop of one ``backward()`` per example. Goal >= 10x.
2. The full train x test score matrix (``compute_scores(...).matrix()``, LiSSA with AllenNLP's defaults)
   against an AllenNLP-style loop with the same settings and the same batch sequence: training gradients
   one example at a time, then for every test point its gradient, its own LiSSA recursion on that one
   vector, and one dot product per training example. The loop is run on a sub-sample of the test points
   and extrapolated linearly (its cost per test point is constant); its scores are checked against ours.
   Goal >= 30x.
3. Peak memory while streaming every score chunk and the self-influence, as the training set grows, one
   subprocess per size (peak RSS reset after setup): it should level off at the memory budget, while the
   training gradients alone (what a materialize-everything approach holds) grow linearly.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch starts its thread pool

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))  # the shared digits task lives with the tests

import influence_store as ist  # noqa: E402
from influence_store.gradients import TrackedModel  # noqa: E402
from tasks import DigitsMLP, ce_loss, digits_mlp_task  # noqa: E402


def timed(fn, repeats: int = 1) -> tuple[float, object]:
    """Best wall time of ``repeats`` calls (the one least disturbed by other load, as timeit does), and
    the last result."""
    times, result = [], None
    for _ in range(repeats):
        started = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - started)
    return min(times), result


# ---------- the AllenNLP-style baseline, written with plain autograd ----------

def loop_grads(model, x, y) -> list[list[torch.Tensor]]:
    """One backward() per example, gradients kept per parameter tensor (AllenNLP's train-instance loop)."""
    params = list(model.parameters())
    grads = []
    for i in range(len(x)):
        loss = ce_loss(model, (x[i:i + 1], y[i:i + 1])).sum()
        grads.append([g.detach() for g in torch.autograd.grad(loss, params)])
    return grads


def loop_lissa(model, v, x, y, l2, batch_size, damping, scale, steps, seed) -> list[torch.Tensor]:
    """AllenNLP's get_inverse_hvp_lissa for one vector: one double-backward HVP per recursion step."""
    params = list(model.parameters())
    generator = torch.Generator().manual_seed(seed)  # the batch order compute_scores uses

    def batches():
        while True:
            order = torch.randperm(len(x), generator=generator)
            yield from (order[s:s + batch_size] for s in range(0, len(x), batch_size))

    stream = batches()
    h = [t.clone() for t in v]
    for _ in range(steps):
        idx = next(stream)
        loss = ce_loss(model, (x[idx], y[idx])).mean()
        grads = torch.autograd.grad(loss, params, create_graph=True)
        hvp = torch.autograd.grad(grads, params, grad_outputs=h)
        h = [vi + (1 - damping) * hi - (hv.detach() + l2 * hi) / scale for vi, hi, hv in zip(v, h, hvp)]
    return [t / scale for t in h]


def loop_scores(task, test_indices, lissa, train_grads, seed=0) -> torch.Tensor:
    """Scores of the given test points, each on its own: gradient, LiSSA, a dot per training example."""
    model = task.model
    xtr, ytr = task.train.tensors
    xte, yte = task.test.tensors
    rows = []
    for t in test_indices:
        (v,) = loop_grads(model, xte[t:t + 1], yte[t:t + 1])
        inverse = loop_lissa(model, v, xtr, ytr, task.l2, seed=seed, **lissa)
        rows.append([float(sum((a * b).sum() for a, b in zip(inverse, g))) for g in train_grads])
    return torch.tensor(rows, dtype=torch.float64)


# ---------- 1 and 2 ----------

def bench_gradients(task, repeats: int) -> float:
    model = TrackedModel(task, [n for n, _ in task.model.named_parameters()])
    xtr, ytr = task.train.tensors
    fast, grads = timed(lambda: torch.cat([g for _, g in model.grad_chunks("train")]), 2 * repeats)
    slow, looped = timed(lambda: loop_grads(task.model, xtr, ytr), repeats)
    looped = torch.stack([torch.cat([t.reshape(-1) for t in g]) for g in looped])
    error = float((grads - looped).norm() / looped.norm())
    print(f"  vmap, chunked to the budget: {fast:8.3f} s  ({len(xtr)} examples x {model.num_params} parameters)")
    print(f"  loop of backward() calls   : {slow:8.3f} s")
    print(f"  speed-up                   : {slow / fast:8.1f}x   (goal >= 10x; relative difference {error:.1e})")
    return slow / fast


def bench_scores(task, baseline_tests: int) -> float:
    n_train, n_test = len(task.train), len(task.test)
    computation = ist.compute_scores(task, approximator="lissa", seed=0)  # AllenNLP's defaults
    o = computation.approximator.options
    lissa = dict(batch_size=o.batch_size, damping=o.damping, scale=float(o.scale),
                 steps=computation.approximator.steps)
    fast, scores = timed(lambda: ist.compute_scores(task, approximator="lissa", seed=0).matrix(), 2)

    xtr, ytr = task.train.tensors
    grad_time, train_grads = timed(lambda: loop_grads(task.model, xtr, ytr), 2)
    sample = torch.linspace(0, n_test - 1, min(baseline_tests, n_test)).round().long().unique().tolist()
    per_test, looped = timed(lambda: loop_scores(task, sample, lissa, train_grads))
    per_test /= len(sample)
    slow = grad_time + per_test * n_test
    error = float((scores[sample] - looped).norm() / looped.norm())
    print(f"  settings                   : {n_train} train x {n_test} test, lissa batch_size={o.batch_size} "
          f"damping={o.damping:g} scale={o.scale:g} steps={lissa['steps']} (AllenNLP defaults)")
    print(f"  compute_scores().matrix()  : {fast:8.2f} s  (all {n_test} test points, everything included)")
    print(f"  AllenNLP-style loop        : {slow:8.2f} s  (extrapolated: train gradients {grad_time:.2f} s + "
          f"{per_test:.3f} s per test point, measured on {len(sample)} of {n_test} test points)")
    print(f"  speed-up                   : {slow / fast:8.1f}x   (goal >= 30x; scores on the sample agree to "
          f"{error:.1e} relative)")
    return slow / fast


# ---------- 3 ----------

def synthetic_digits_task(n_train: int, n_test: int) -> ist.Task:
    """The digits MLP on n_train inputs: digits images cycled, with a little noise so none repeat."""
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x / 16.0, dtype=torch.float32)
    y = torch.tensor(y, dtype=torch.long)
    generator = torch.Generator().manual_seed(0)
    index = torch.arange(n_train + n_test) % len(x)
    xs = x[index] + 0.01 * torch.randn(len(index), x.shape[1], generator=generator)
    torch.manual_seed(0)
    data = torch.utils.data.TensorDataset
    return ist.Task(DigitsMLP(), ce_loss, data(xs[:n_train], y[index[:n_train]]),
                    data(xs[n_train:], y[index[n_train:]]), l2=1e-3)


def peak_rss_mb() -> float:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmHWM")) / 1024


def stream(computation) -> tuple[float, float]:
    """Every score chunk, dropped once made (as the store does), then the self-influence: seconds of each."""
    started = time.perf_counter()
    for chunk in computation.chunks():
        del chunk
    middle = time.perf_counter()
    computation.self_influence()
    return middle - started, time.perf_counter() - middle


def memory_child(n_train: int, n_test: int, budget_mb: float, depth: int) -> None:
    """In a fresh process: the peak RSS growth of streaming every score and the self-influence.

    A tiny task runs the same code first, so the one-off costs (torch's code pages, thread pools,
    allocator arenas) are paid before the peak is reset and only what scales with the data is measured.
    """
    options = {"depth_iters": depth}
    stream(ist.compute_scores(synthetic_digits_task(64, 8), approximator="lissa", options=options,
                              memory_budget_mb=budget_mb))
    task = synthetic_digits_task(n_train, n_test)
    computation = ist.compute_scores(task, approximator="lissa", options=options, memory_budget_mb=budget_mb)
    with open("/proc/self/clear_refs", "w") as clear:  # reset the peak: measure the streaming only
        clear.write("5")
    before = peak_rss_mb()
    scoring, self_influence = stream(computation)
    print(json.dumps({"peak_mb": peak_rss_mb() - before, "scores_s": scoring, "self_influence_s": self_influence,
                      "test_chunk": computation.test_chunk_size, "params": computation.model.num_params,
                      "cached": computation._train_grads is not None}))


def bench_memory(sizes: list[int], n_test: int, budget_mb: float, depth: int) -> list[float]:
    # glibc raises its mmap threshold after large frees and then keeps freed blocks, so RSS drifts with the
    # allocation history (20-90 MB for the same run here); pinned, freed tensors go back and RSS follows live
    # tensors.
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072", "OMP_NUM_THREADS": str(torch.get_num_threads())}
    print(f"  memory budget {budget_mb:g} MB, {n_test} test points, lissa depth_iters={depth} (memory does not "
          f"depend on depth)")
    print("  peak RSS growth while streaming, one subprocess per size, glibc MALLOC_MMAP_THRESHOLD_=131072 so "
          "that RSS follows live tensors")
    print(f"  {'n_train':>8} {'peak MB':>9} {'train grads MB':>15} {'cached':>7} {'test chunk':>11} "
          f"{'scores s':>9} {'self-infl. s':>13}")
    peaks = []
    for n in sizes:
        out = subprocess.run([sys.executable, __file__, "--memory-child", str(n), str(n_test), str(budget_mb),
                              str(depth)], capture_output=True, text=True, check=True, env=env)
        row = json.loads(out.stdout.strip().splitlines()[-1])
        materialized = n * row["params"] * 4 / 2**20
        peaks.append(row["peak_mb"])
        print(f"  {n:>8} {row['peak_mb']:>9.1f} {materialized:>15.1f} {str(row['cached']):>7} "
              f"{row['test_chunk']:>11} {row['scores_s']:>9.1f} {row['self_influence_s']:>13.1f}")
    over = [p for n, p in zip(sizes, peaks) if n * 2410 * 4 > budget_mb * 2**20]
    if over:
        print(f"  above the budget the peak stays within {min(over):.0f}-{max(over):.0f} MB while the training "
              f"gradients grow {sizes[-1] // sizes[0]}x")
    return peaks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller sizes (a smoke test, about a minute)")
    parser.add_argument("--parts", default="1,2,3", help="which measurements to run, e.g. --parts 3")
    parser.add_argument("--threads", type=int, default=1, help="torch threads for both sides (default 1)")
    parser.add_argument("--memory-child", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_child:
        n, n_test, budget, depth = args.memory_child
        memory_child(int(n), int(n_test), float(budget), int(depth))
        return

    torch.set_num_threads(args.threads)
    parts = set(args.parts.split(","))
    n_train, n_test = (400, 60) if args.quick else (1200, 400)
    threads = torch.get_num_threads()
    print(f"influence-store core benchmark (torch {torch.__version__}, {threads} thread{'s' * (threads != 1)})")
    task = digits_mlp_task(n_train=n_train, n_test=n_test)
    if "1" in parts:
        print("\n1. per-example gradients, digits MLP")
        bench_gradients(task, repeats=3)
    if "2" in parts:
        print("\n2. full score matrix vs an AllenNLP-style loop (same settings, same batch order)")
        bench_scores(task, baseline_tests=8 if args.quick else 16)
    if "3" in parts:
        print("\n3. peak memory as the training set grows")
        sizes = [1000, 4000] if args.quick else [1000, 2000, 4000, 8000, 16000]
        bench_memory(sizes, n_test=40, budget_mb=16.0, depth=5)


if __name__ == "__main__":
    main()
