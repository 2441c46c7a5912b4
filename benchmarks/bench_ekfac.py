"""EK-FAC on a ~1M-parameter CNN (synthetic 28x28 images), side by side with kronfluence 1.0.1.

Each side runs in its own subprocess (so each has its own peak RSS), in interleaved rounds:
  ours:        influence-store's ``execute_run`` with ``-a ekfac``: factors, every score stored in a
               SQLite store, self-influence on;
  kronfluence: ``fit_all_factors`` (EK-FAC), ``compute_pairwise_scores`` and ``compute_self_scores``
               (scores saved in its output folder).
Both use the true Fisher (sampled labels) and the same ridge. Reported: wall time (minimum over rounds),
peak RSS, the time ratio ours / kronfluence, and the Pearson correlation of the two score matrices per
test column (they differ by the Fisher's sampling noise only).

  .venv/bin/python benchmarks/bench_ekfac.py                       # the full size: 50,000 x 1,000
  .venv/bin/python benchmarks/bench_ekfac.py --train 2000 --test 100 --rounds 2   # a reduced size
  .venv/bin/python benchmarks/bench_ekfac.py --kronfluence-limit 1800   # full size, kronfluence stopped at 30 min

With ``--kronfluence-limit`` a kronfluence run that has not finished is stopped there; its time is then only
known to exceed the limit, and the ratio printed is an upper bound (ours / limit).

``--refine`` instead measures CG refinement on a digits tanh MLP: Pearson against the exact solve after
each batched Hessian product, and the products unpreconditioned CG needs to reach the same residual, both
one CG per test vector and one block CG (``--hidden 64`` is the 4,810-parameter model; smaller is quicker).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))


class CNN(torch.nn.Module):
    """Two conv + pool stages and two Linear layers: 962,926 parameters at width 1."""

    def __init__(self, width: float = 1.0) -> None:
        super().__init__()
        c1, c2, hidden = int(32 * width), int(64 * width), int(300 * width)
        self.conv1 = torch.nn.Conv2d(1, c1, 3, padding=1)
        self.conv2 = torch.nn.Conv2d(c1, c2, 3, padding=1)
        self.fc1 = torch.nn.Linear(c2 * 7 * 7, hidden)
        self.fc2 = torch.nn.Linear(hidden, 10)

    def forward(self, x):
        pool = torch.nn.functional.max_pool2d
        h = pool(torch.relu(self.conv1(x)), 2)
        h = pool(torch.relu(self.conv2(h)), 2)
        return self.fc2(torch.relu(self.fc1(h.flatten(1))))


def ce_loss(model, batch):
    x, y = batch
    return torch.nn.functional.cross_entropy(model(x), y, reduction="none")


def make_problem(n_train: int, n_test: int, width: float, seed: int = 0):
    """Synthetic images whose labels a random linear teacher gives; the CNN trained one epoch on them."""
    from torch.utils.data import TensorDataset

    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n_train + n_test, 1, 28, 28, generator=g)
    teacher = torch.randn(28 * 28, 10, generator=g)
    y = (x.flatten(1) @ teacher + 3 * torch.randn(len(x), 10, generator=g)).argmax(1)
    torch.manual_seed(seed)
    model = CNN(width)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    for start in range(0, n_train, 128):
        optimizer.zero_grad()
        ce_loss(model, (x[start:start + 128], y[start:start + 128])).mean().backward()
        optimizer.step()
    model.eval()
    return model, TensorDataset(x[:n_train], y[:n_train]), TensorDataset(x[n_train:], y[n_train:])


def run_side(args) -> dict:
    torch.set_num_threads(args.threads)
    model, train, test = make_problem(args.train, args.test, args.width)
    started = time.perf_counter()
    if args.side == "ours":
        import influence_store as ist
        from influence_store.runs import execute_run
        from influence_store.store import Store

        task = ist.Task(model, ce_loss, train, test)
        store = Store(str(Path(args.workdir) / "store.db"))
        result = execute_run(store, task, approximator="ekfac", options={"damping": args.ridge, "batch_size": 128},
                             memory_budget_mb=args.budget_mb, self_influence=True)
        run_id = result.run_id
        extra = {"run_id": run_id, "diagnostics_seconds_factors":
                 store.run(run_id)["diagnostics"]["approximator"].get("seconds_factors")}
    else:
        from kronfluence_peer import kronfluence_scores

        kronfluence_scores(model, train, test, ridge=args.ridge, fisher="true", batch_size=128,
                           self_influence=True, output_dir=args.workdir)
        extra = {}
    seconds = time.perf_counter() - started
    return {"seconds": seconds, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "params": sum(p.numel() for p in model.parameters()), **extra}


def compare(args) -> None:
    results: dict[str, list[dict]] = {"ours": [], "kronfluence": []}
    sides = ["ours"] if args.skip_kronfluence else ["ours", "kronfluence"]
    workdirs = {side: tempfile.mkdtemp(prefix=f"bench-ekfac-{side}-") for side in sides}
    for round_ in range(args.rounds):
        for side in (sides if round_ % 2 == 0 else sides[::-1]):  # interleaved
            cmd = [sys.executable, __file__, "--side", side, "--workdir", workdirs[side] + f"/r{round_}",
                   "--train", str(args.train), "--test", str(args.test), "--width", str(args.width),
                   "--ridge", str(args.ridge), "--threads", str(args.threads), "--budget-mb", str(args.budget_mb)]
            Path(workdirs[side], f"r{round_}").mkdir()
            limit = args.kronfluence_limit if side == "kronfluence" else None
            try:
                out = subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=limit).stdout
            except subprocess.TimeoutExpired:  # stopped at the limit: its time is known to exceed it
                results[side].append({"seconds": float(limit), "unfinished": True, "peak_rss_mb": float("nan")})
                print(f"round {round_} {side}: not finished after {limit:.0f} s, stopped", flush=True)
                continue
            results[side].append(json.loads(out.strip().splitlines()[-1]))
            print(f"round {round_} {side}: {results[side][-1]}", flush=True)
    ours = min(r["seconds"] for r in results["ours"])
    print(f"\n{results['ours'][0]['params']:,} parameters, {args.train:,} train x {args.test:,} test, "
          f"{args.threads} thread(s), budget {args.budget_mb} MB, ridge {args.ridge}")
    print(f"ours (ekfac, every score stored, self-influence): {ours:.1f} s, "
          f"peak RSS {max(r['peak_rss_mb'] for r in results['ours']):.0f} MB")
    if "kronfluence" in sides and all(r.get("unfinished") for r in results["kronfluence"]):
        limit = results["kronfluence"][0]["seconds"]
        print(f"kronfluence 1.0.1 (ekfac, pairwise + self scores): not finished within {limit:.0f} s")
        print(f"time ratio ours / kronfluence: below {ours / limit:.2f} (goal <= 1)")
    elif "kronfluence" in sides:
        theirs = min(r["seconds"] for r in results["kronfluence"] if not r.get("unfinished"))
        print(f"kronfluence 1.0.1 (ekfac, pairwise + self scores): {theirs:.1f} s, "
              f"peak RSS {max(r['peak_rss_mb'] for r in results['kronfluence']):.0f} MB")
        print(f"time ratio ours / kronfluence: {ours / theirs:.2f} (goal <= 1)")
        agreement(workdirs, results)


def agreement(workdirs, results) -> None:
    """Pearson per test column between the stored scores and kronfluence's (sampling noise apart)."""
    from influence_store.store import Store

    from kronfluence.analyzer import Analyzer  # noqa: F401 - only to fail early if it is missing
    from safetensors.torch import load_file

    store = Store(str(Path(workdirs["ours"]) / "r0" / "store.db"))
    run_id = results["ours"][0]["run_id"]
    peer_file = next(Path(workdirs["kronfluence"], "r0").rglob("scores_pairwise/pairwise_scores.safetensors"))
    peer = load_file(str(peer_file))["all_modules"].double()
    train_ids = store.example_ids(run_id, "train")
    columns = []
    for t in range(min(20, peer.shape[0])):
        rows = dict(store.score_rows(run_id, store.test_example_id(run_id, str(t))))
        ours = torch.tensor([rows[i] for i in train_ids], dtype=torch.float64)
        columns.append(float(torch.corrcoef(torch.stack([ours, peer[t]]))[0, 1]))
    print(f"Pearson per test column (first {len(columns)}): min {min(columns):.3f}, "
          f"median {sorted(columns)[len(columns) // 2]:.3f}")


def refine(args) -> None:
    """CG refinement on the digits tanh MLP: quality against exact, products against unpreconditioned CG."""
    import influence_store as ist
    from influence_store.freezing import tracked_parameters
    from influence_store.gradients import TrackedModel
    from influence_store.plugins.ekfac import EKFAC
    from influence_store.solvers import block_pcg
    from influence_store.plugins.exact import Exact
    from sklearn.datasets import load_digits
    from tasks import DigitsMLP
    from torch.utils.data import TensorDataset

    torch.set_num_threads(args.threads)
    x, y = load_digits(return_X_y=True)
    x, y = torch.tensor(x / 16.0), torch.tensor(y)
    n = len(x) - 360 if args.train is None else args.train
    torch.manual_seed(0)
    model = DigitsMLP(args.hidden).double()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(300):
        optimizer.zero_grad()
        ce_loss(model, (x[:n], y[:n])).mean().backward()
        optimizer.step()
    task = ist.Task(model, ce_loss, TensorDataset(x[:n], y[:n]), TensorDataset(x[n:n + 50], y[n:n + 50]))
    tm = TrackedModel(task, tracked_parameters(model, "all"), memory_budget_mb=args.budget_mb)
    g = tm.per_example_grads("test", list(range(len(task.test)))).double()
    grads = torch.cat([c for _, c in tm.grad_chunks("train")]).double()
    started = time.perf_counter()
    exact = Exact(Exact.Options(damping=args.ridge, max_params=10**6), tm)
    exact.prepare()
    truth = exact.inverse_hvp(g) @ grads.T
    print(f"digits MLP: {tm.num_params:,} parameters, {n} train x {len(task.test)} test, ridge {args.ridge}; "
          f"exact {time.perf_counter() - started:.1f} s ({exact.diagnostics})")

    def curvature(v):
        return tm.hvp(v).double() + args.ridge * v

    _, row_trace = row_cg(curvature, g, 200, 1e-8)  # one unpreconditioned CG per row (batched)

    def needed(trace, residual):
        return next((k for k, value in enumerate(trace) if value <= residual), None)

    for fisher, preconditioner in (("true", "none"), ("true", "ekfac"), ("empirical", "ekfac")):
        started = time.perf_counter()
        ekfac = EKFAC(EKFAC.Options(damping=args.ridge, fisher=fisher, refine_iters=args.refine_iters,
                                    refine_tol=args.refine_tol, refine_preconditioner=preconditioner), tm)
        ekfac.prepare()
        refined = ekfac.inverse_hvp(g) @ grads.T
        seconds = time.perf_counter() - started
        used = ekfac.diagnostics["refine_curvature_products"]
        target = ekfac.diagnostics["refine_residual_traces"][0][-1]
        precondition = ekfac.precondition if preconditioner == "ekfac" else (lambda r: r)
        print(f"fisher={fisher} refine_preconditioner={preconditioner}: EK-FAC alone Pearson "
              f"{pearson_columns(ekfac.precondition(g) @ grads.T, truth)}; refined to residual {target:.1e}: "
              f"Pearson {pearson_columns(refined, truth)}, {used} batched Hessian products, {seconds:.1f} s; "
              f"unpreconditioned CG to the same residual: {needed(row_trace, target)} per row")
        print("  products  Pearson (min / mean)      residual  CG per row  ratio")
        for k in range(1, 9):
            xk, trace, _, _ = block_pcg(curvature, precondition, g, k, 0.0)
            r, plain = trace[-1], needed(row_trace, trace[-1])
            print(f"  {k:8d}  {pearson_columns(xk @ grads.T, truth):24s}  {r:8.1e}  {plain!s:>10}  "
                  f"{plain / k if plain else float('nan'):5.2f}")


def row_cg(curvature, b, iters: int, tol: float):
    """Textbook CG from zero, one per row of ``b`` (rows share each batched product). Returns (x, trace of
    the largest relative residual after each product)."""
    norms = b.norm(dim=1)
    x, r = torch.zeros_like(b), b.clone()
    p, rr = r.clone(), (r * r).sum(1)
    trace = [1.0]
    for _ in range(iters):
        ap = curvature(p)
        alpha = rr / (p * ap).sum(1).clamp_min(1e-300)
        x, r = x + alpha[:, None] * p, r - alpha[:, None] * ap
        rr_new = (r * r).sum(1)
        p, rr = r + (rr_new / rr.clamp_min(1e-300))[:, None] * p, rr_new
        trace.append(float((r.norm(dim=1) / norms).max()))
        if trace[-1] < tol:
            break
    return x, trace


def pearson_columns(a, b) -> str:
    values = [float(torch.corrcoef(torch.stack([a[t], b[t]]))[0, 1]) for t in range(len(a))]
    return f"min {min(values):.4f} / mean {sum(values) / len(values):.4f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train", type=int, default=None, help="training examples (50,000; --refine: 1,437)")
    parser.add_argument("--test", type=int, default=1000)
    parser.add_argument("--width", type=float, default=1.0, help="CNN width multiplier (1.0: 962,926 parameters)")
    parser.add_argument("--ridge", type=float, default=1e-3)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--budget-mb", type=float, default=1024.0, help="influence-store's memory budget")
    parser.add_argument("--skip-kronfluence", action="store_true")
    parser.add_argument("--kronfluence-limit", type=float, default=None,
                        help="stop kronfluence after this many seconds; the ratio is then an upper bound")
    parser.add_argument("--refine", action="store_true", help="measure CG refinement on the digits MLP instead")
    parser.add_argument("--hidden", type=int, default=64, help="--refine: hidden units (64: 4,810 parameters)")
    parser.add_argument("--refine-iters", type=int, default=100)
    parser.add_argument("--refine-tol", type=float, default=1e-4)
    parser.add_argument("--side", choices=["ours", "kronfluence"], help=argparse.SUPPRESS)
    parser.add_argument("--workdir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.refine:
        refine(args)
        return
    args.train = 50_000 if args.train is None else args.train
    if args.side:
        print(json.dumps(run_side(args)))
    else:
        compare(args)


if __name__ == "__main__":
    main()
