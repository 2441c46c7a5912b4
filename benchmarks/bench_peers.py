"""influence-store side by side with pyDVL and dattri, and with a tight-torch limit, on the same models.

    bash benchmarks/install_peers.sh                 # once: pyDVL 0.10.0 + dattri 0.3.0, never another torch
    .venv/bin/python benchmarks/bench_peers.py       # every case, 3 interleaved rounds, 2 threads
    .venv/bin/python benchmarks/bench_peers.py --cases exact lissa45 --rounds 2

This script installs nothing; a peer that is not importable is reported and skipped. Every case trains its
model first (sklearn data, fixed seeds) and is not timed for that. Then, per round, each contender computes
the full score matrix (k test x n_train) from the trained model, in the same order every round: the timing
is the minimum over rounds. Every matrix is checked against a float64 reference (the exact ridge-regularized
inverse for the digits MLP, a converged float64 CG for the 100k model): Pearson over all scores after
aligning the sign convention (pyDVL's and dattri's signs differ from ours), and counts of test vectors whose
scores are all zero or contain NaN.

"tight torch" is the limit: the same arithmetic written directly with torch.func in this file, with no
framework around it (vmap per-example gradients, reverse-over-reverse HVPs over the whole batch, a dense
Hessian by one vmap over the identity, Cholesky, one GEMM).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import warnings
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("TQDM_DISABLE", "1")  # the peers draw progress bars
warnings.filterwarnings("ignore")

import torch  # noqa: E402
from torch.func import functional_call, grad, vjp, vmap  # noqa: E402
from torch.utils.data import DataLoader, TensorDataset  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import influence_store as ist  # noqa: E402

DAMPING = 0.01
CG_TOL = 1e-6  # the cg plugin's default; the peers and tight torch run the iterations it took
LISSA = {"batch_size": 8, "damping": 3e-3, "scale": 1e4}  # AllenNLP's settings


# ---------- the models (trained once, not timed) ----------

def digits(hidden: int, seed: int = 0):
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x / 16.0, dtype=torch.float32)
    y = torch.tensor(y)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    x, y = x[order], y[order]
    n = 1437
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(64, hidden), torch.nn.Tanh(), torch.nn.Linear(hidden, 10))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(300):
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(model(x[:n]), y[:n]).backward()
        optimizer.step()
    model.eval()
    return model, x[:n], y[:n], x[n:], y[n:]


def large():
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import large_lissa_task as large_task

    x, y = large_task.data()
    n = large_task.N_TRAIN
    return large_task.model_for(x[:n], y[:n]), x[:n], y[:n], x[n:], y[n:]


def ce(model, batch):
    x, y = batch
    return torch.nn.functional.cross_entropy(model(x), y, reduction="none")


# ---------- tight torch: the arithmetic and nothing else ----------

class Tight:
    def __init__(self, model, xtr, ytr, dtype=torch.float32):
        self.model = model
        self.names = [n for n, _ in model.named_parameters()]
        self.shapes = [p.shape for p in model.parameters()]
        self.sizes = [p.numel() for p in model.parameters()]
        self.flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()]).to(dtype)
        self.xtr, self.ytr = xtr.to(dtype), ytr

    def loss(self, flat, x, y):
        params = dict(zip(self.names, [t.view(s) for t, s in zip(torch.split(flat, self.sizes), self.shapes)]))
        return torch.nn.functional.cross_entropy(functional_call(self.model, params, (x,)), y, reduction="sum")

    def grads(self, x, y):
        one = vmap(grad(lambda f, xi, yi: self.loss(f, xi[None], yi[None])), in_dims=(None, 0, 0))
        x = x.to(self.flat.dtype)
        return torch.cat([one(self.flat, x[s:s + 4096], y[s:s + 4096]) for s in range(0, len(x), 4096)])

    def hvp(self, vectors, x=None, y=None):  # the full training set in one batch unless given one
        x = self.xtr if x is None else x
        y = self.ytr if y is None else y
        _, pullback = vjp(lambda f: grad(self.loss)(f, x, y), self.flat)  # reverse-over-reverse
        hv = vmap(lambda v: pullback(v)[0])(vectors.to(self.flat.dtype))
        return hv / len(x)

    def exact(self, xte, yte, ridge):
        h = self.hvp(torch.eye(len(self.flat), dtype=self.flat.dtype)).double()
        h = (h + h.T) / 2 + ridge * torch.eye(len(h), dtype=torch.float64)
        factor = torch.linalg.cholesky(h)
        ihvp = torch.cholesky_solve(self.grads(xte, yte).double().T, factor).T
        return ihvp @ self.grads(self.xtr, self.ytr).double().T

    def cg(self, xte, yte, ridge, iterations, tol=0.0):
        b = self.grads(xte, yte).double()
        x, r = torch.zeros_like(b), b.clone()
        p, rr = r.clone(), (r * r).sum(1)
        for _ in range(iterations):
            ap = self.hvp(p).double() + ridge * p
            alpha = rr / (p * ap).sum(1)
            x += alpha[:, None] * p
            r -= alpha[:, None] * ap
            new = (r * r).sum(1)
            if tol and bool((new.sqrt() <= tol * b.norm(dim=1)).all()):
                break
            p = r + (new / rr)[:, None] * p
            rr = new
        return x @ self.grads(self.xtr, self.ytr).double().T

    def lissa(self, xte, yte, steps, seed=0):
        o = LISSA
        v = self.grads(xte, yte)
        generator = torch.Generator().manual_seed(seed)
        order = torch.randperm(len(self.xtr), generator=generator)
        h, position = v, 0
        for _ in range(steps):
            if position + o["batch_size"] > len(order):
                order, position = torch.randperm(len(self.xtr), generator=generator), 0
            idx = order[position:position + o["batch_size"]]
            position += o["batch_size"]
            h = v + (1 - o["damping"]) * h - self.hvp(h, self.xtr[idx], self.ytr[idx]) / o["scale"]
        return (h / o["scale"]) @ self.grads(self.xtr, self.ytr).T


# ---------- the contenders: each returns [k, n_train] ----------

def ours(method, model, xtr, ytr, xte, yte, **kw):
    task = ist.Task(model, ce, TensorDataset(xtr, ytr), TensorDataset(xte, yte))
    options = {"exact": {"damping": DAMPING, "max_params": 10_000},
               "cg": {"damping": DAMPING, "tol": CG_TOL},
               "lissa": {**LISSA, "depth_iters": kw.get("steps", 1)}}[method]
    computation = ist.compute_scores(task, method, options, self_influence=False)  # the matrix only
    scores = computation.matrix()
    if method == "cg":  # the others then run as many iterations as the plugin needed
        kw["done"]["iterations"] = computation.approximator.diagnostics["max_iterations"]
    return scores


def pydvl(method, model, xtr, ytr, xte, yte, **kw):
    from pydvl.influence import InfluenceMode
    from pydvl.influence.torch import CgInfluence, DirectInfluence, LissaInfluence

    loss = torch.nn.functional.cross_entropy
    if method == "exact":
        influence = DirectInfluence(model, loss, regularization=DAMPING)
        loader = DataLoader(TensorDataset(xtr, ytr), batch_size=len(xtr))
    elif method == "cg":
        influence = CgInfluence(model, loss, regularization=DAMPING, rtol=1e-30, atol=1e-30,
                                maxiter=kw["iterations"], solve_simultaneously=True, warn_on_max_iteration=False)
        loader = DataLoader(TensorDataset(xtr, ytr), batch_size=len(xtr))
    else:
        influence = LissaInfluence(model, loss, maxiter=kw["steps"], dampen=LISSA["damping"], scale=LISSA["scale"],
                                   rtol=1e-30, warn_on_max_iteration=False)
        loader = DataLoader(TensorDataset(xtr, ytr), batch_size=LISSA["batch_size"], shuffle=True,
                            generator=torch.Generator().manual_seed(0))
    influence = influence.fit(loader)
    return influence.influences(xte, yte, xtr, ytr, mode=InfluenceMode.Up).detach()


def dattri(method, model, xtr, ytr, xte, yte, **kw):
    from dattri.algorithm.influence_function import IFAttributorCG, IFAttributorExplicit, IFAttributorLiSSA
    from dattri.task import AttributionTask

    def f(params, data):
        x, y = data
        return torch.nn.functional.cross_entropy(functional_call(model, params, (x,)), y.long())

    task = AttributionTask(loss_func=f, model=model, checkpoints=model.state_dict())
    if method == "exact":
        attributor = IFAttributorExplicit(task, regularization=DAMPING)
    elif method == "cg":
        attributor = IFAttributorCG(task, max_iter=kw["iterations"], tol=1e-30, regularization=DAMPING)
    else:
        attributor = IFAttributorLiSSA(task, batch_size=LISSA["batch_size"], recursion_depth=kw["steps"],
                                       damping=LISSA["damping"], scaling=LISSA["scale"])
    full = DataLoader(TensorDataset(xtr, ytr), batch_size=len(xtr))
    attributor.cache(full)
    train = DataLoader(TensorDataset(xtr, ytr), batch_size=len(xtr))
    test = DataLoader(TensorDataset(xte, yte), batch_size=len(xte))
    return attributor.attribute(train, test).T.detach()


def tight(method, model, xtr, ytr, xte, yte, **kw):
    t = Tight(model, xtr, ytr)
    if method == "exact":
        return t.exact(xte, yte, DAMPING)
    if method == "cg":
        return t.cg(xte, yte, DAMPING, kw["iterations"])
    return t.lissa(xte, yte, kw["steps"])


CASES = {
    "exact": dict(hidden=32, k=50, method="exact"),
    "cg": dict(hidden=32, k=50, method="cg"),
    "cg100k": dict(hidden=1336, k=10, method="cg"),
    "lissa45": dict(hidden=32, k=50, method="lissa", steps=45),
    "lissa359": dict(hidden=32, k=50, method="lissa", steps=359),
    # make_classification 20,000 x 500, 30,154 parameters, LiSSA defaults: no peer runs it; the reference is
    # tight torch itself (same batch order, so the same scores up to rounding)
    "lissa20k": dict(large=True, k=500, method="lissa", steps=625),
}


def reference(case, model, xtr, ytr, xte, yte):
    """float64 scores to check every contender against (ridge = the case's damping)."""
    t = Tight(_double(model), xtr, ytr, dtype=torch.float64)
    ridge = LISSA["damping"] * LISSA["scale"] if case["method"] == "lissa" else DAMPING
    if case["hidden"] * 75 > 20_000:  # no dense Hessian for the 100k model: CG to convergence
        return t.cg(xte.double(), yte, ridge, 1000, tol=1e-7)
    return t.exact(xte.double(), yte, ridge)


def _double(model):
    import copy

    return copy.deepcopy(model).double()


def pearson(a, b):
    a, b = a.double().flatten(), b.double().flatten()
    ok = torch.isfinite(a) & torch.isfinite(b)
    a, b = a[ok] - a[ok].mean(), b[ok] - b[ok].mean()
    return float((a * b).sum() / (a.norm() * b.norm()).clamp_min(1e-300))


def available(name):
    try:
        if name == "pydvl":
            import pydvl.influence.torch  # noqa: F401
        if name == "dattri":
            import dattri.algorithm.influence_function  # noqa: F401
        return None
    except Exception as exc:  # noqa: BLE001
        return f"{type(exc).__name__}: {exc}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", nargs="*", default=list(CASES), choices=list(CASES))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--skip", nargs="*", default=[], help="contenders to leave out (pydvl, dattri)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    contenders = {"influence-store": ours, "pydvl": pydvl, "dattri": dattri, "tight torch": tight}
    for name in ("pydvl", "dattri"):
        why = available(name) if name not in args.skip else "skipped (--skip)"
        if why:
            print(f"{name}: not measured ({why}); install with: bash benchmarks/install_peers.sh")
            contenders.pop(name)
    print(f"torch {torch.__version__}, {args.threads} threads, {args.rounds} interleaved rounds, minima")
    rows = []
    for key in args.cases:
        case = CASES[key]
        model, xtr, ytr, xte, yte = large() if case.get("large") else digits(case["hidden"])
        xte, yte = xte[:case["k"]], yte[:case["k"]]
        p = sum(q.numel() for q in model.parameters())
        ref = tight("lissa", model, xtr, ytr, xte, yte, steps=case["steps"]) if case.get("large") else reference(
            case, model, xtr, ytr, xte, yte)
        kw = {k: case[k] for k in ("steps",) if k in case}
        if case["method"] == "cg":
            kw["done"] = kw  # influence-store runs first each round and sets the iterations for the others
        times, results = {n: [] for n in contenders}, {}
        for _ in range(args.rounds):
            for name, fn in contenders.items():
                if case.get("large") and name not in ("influence-store", "tight torch"):
                    continue
                started = time.perf_counter()
                try:
                    results[name] = fn(case["method"], model, xtr, ytr, xte, yte, **kw)
                except Exception as exc:  # noqa: BLE001  a peer that fails is reported, not fatal
                    results[name] = f"{type(exc).__name__}: {str(exc)[:100]}"
                times[name].append(time.perf_counter() - started)
        shown = {k: v for k, v in kw.items() if k != "done"}
        label = f"{key} (p={p:,}, n={len(xtr)}, k={case['k']}" + "".join(f", {k}={v}" for k, v in shown.items()) + ")"
        for name in contenders:
            if name not in results:
                continue
            out = results[name]
            if isinstance(out, str):
                rows.append((label, name, None, out))
                continue
            out = out.reshape(ref.shape).double()
            r = pearson(out, ref)
            zero = int((out == 0).all(dim=1).sum())
            nan = int((~torch.isfinite(out)).any(dim=1).sum())
            rows.append((label, name, min(times[name]), f"pearson {abs(r):.4f}{' (sign flipped)' if r < 0 else ''}, "
                                                         f"zero {zero}, nan {nan}"))
    report(rows)


def report(rows) -> None:
    print("\n| case | contender | seconds (min) | x influence-store | x tight torch | check vs float64 reference |")
    print("| --- | --- | ---: | ---: | ---: | --- |")
    by_case = {}
    for label, name, seconds, check in rows:
        by_case.setdefault(label, {})[name] = seconds
    for label, name, seconds, check in rows:
        base, limit = by_case[label].get("influence-store"), by_case[label].get("tight torch")
        if seconds is None:
            print(f"| {label} | {name} | failed | | | {check} |")
            continue
        ratio = f"{seconds / base:.2f}" if base else ""
        to_limit = f"{seconds / limit:.2f}" if limit else ""
        print(f"| {label} | {name} | {seconds:.3f} | {ratio} | {to_limit} | {check} |")


if __name__ == "__main__":
    main()
