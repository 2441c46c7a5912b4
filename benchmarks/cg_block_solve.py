"""cg solves a chunk of test gradients as one block of CGs: how much faster than one CG per vector?

Baseline, measured in the same run: the same cg approximator called once per test gradient. Also
prints the time of ``exact`` (dense Hessian + Cholesky) on the same model, and checks that all three
agree. Needs the example plugin installed: pip install ./examples/influence-store-cg

    .venv/bin/python benchmarks/cg_block_solve.py [--tests 64] [--damping 0.1]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

import influence_store as ist

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from tasks import digits_mlp_task  # noqa: E402


def timed(function):
    started = time.perf_counter()
    result = function()
    return result, time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tests", type=int, default=64, help="test gradients solved together")
    parser.add_argument("--damping", type=float, default=0.1, help="ridge; the MLP's Hessian is indefinite")
    args = parser.parse_args()
    task = digits_mlp_task(n_train=600, n_test=args.tests)
    options = {"damping": args.damping, "tol": 1e-6}
    computation = ist.compute_scores(task, approximator="cg", options=options)
    grads = computation.model.per_example_grads("test", range(args.tests))
    cg = computation.approximator

    block, block_s = timed(lambda: cg.inverse_hvp(grads))
    block_hvps = cg.diagnostics["hvps"]
    single, single_s = timed(lambda: torch.cat([cg.inverse_hvp(g[None]) for g in grads]))
    single_hvps = cg.diagnostics["hvps"] - block_hvps
    # compute_scores runs exact's prepare() (dense Hessian + factorization): time it with the solve
    direct, exact_s = timed(lambda: ist.compute_scores(task, approximator="exact", options={"damping": args.damping})
                            .approximator.inverse_hvp(grads))

    iterations = [s["iterations"] for s in cg.diagnostics["solves"]]
    print(f"model: digits MLP, p={computation.model.num_params}, n_train=600, {args.tests} test gradients, "
          f"damping={args.damping}")
    print(f"block cg:          {block_s:8.3f} s  ({iterations[0]} iterations, {block_hvps} vector HVPs)")
    print(f"one cg per vector: {single_s:8.3f} s  (max {max(iterations[1:])} iterations, {single_hvps} vector HVPs)")
    print(f"exact (Hessian + Cholesky, incl. building H): {exact_s:8.3f} s")
    print(f"speed-up of block over one-per-vector: {single_s / block_s:.1f}x")
    print(f"block vs one-per-vector, max relative difference: "
          f"{float(((block - single).norm(dim=1) / single.norm(dim=1)).max()):.2e}")
    print(f"block vs exact, relative error: {float((block - direct).norm() / direct.norm()):.2e}")


if __name__ == "__main__":
    main()
