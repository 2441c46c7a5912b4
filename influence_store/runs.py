"""Run orchestration: task -> scores -> store, resumable and idempotent.

A run is identified by what determines its scores: the model's weights, the training and test
examples (keys + content hashes), the approximator and its options, the freezing policy, seed,
device and dtype. Running the same thing again reports the stored run; a run that stopped
midway resumes at its first unfinished chunk.
"""

from __future__ import annotations

import hashlib
import json
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import InfluenceStoreError
from .store import Store
from .task import Task, content_hash, load_task


@dataclass
class RunResult:
    run_id: int
    status: str  # "done"
    outcome: str  # "computed", "resumed" or "existing"
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        return {"run_id": self.run_id, "status": self.status, "outcome": self.outcome, "seconds": self.seconds}


def weights_sha256(model) -> str:
    """sha256 over the model's parameters and buffers (names, dtypes, shapes, bytes)."""
    import torch

    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        t = tensor.detach().cpu().contiguous()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        digest.update(t.view(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


def example_rows(task: Task, split: str) -> list[tuple[str, str, Any, Any]]:
    """(key, content hash, label, payload) of every example of one split, in order."""
    rows = []
    for key, example in zip(task.keys(split), getattr(task, split)):
        payload = task.describe(example)
        rows.append((key, content_hash(payload), task.label_of(example), payload))
    return rows


def _portable_spec(spec: str) -> str:
    """A file spec with an absolute path, so ``verify`` can load the task again from any folder."""
    where, sep, function = spec.rpartition(":")
    if sep and where.endswith(".py") and Path(where).is_file():
        return f"{Path(where).resolve()}:{function}"
    return spec


def execute_run(store: Store, spec: str | Task, *, task_options: dict | None = None, approximator: str = "lissa",
                options: dict | None = None, freeze: str = "all", freeze_options: dict | None = None,
                model_version: str | None = None, dataset: str | None = None, device: str = "cpu", seed: int = 0,
                dtype: str | None = None, memory_budget_mb: float = 256.0, test_chunk_size: int | None = None,
                self_influence: bool = True, progress: bool = False, resume: int | None = None,
                allow_removed: bool = False, model_mode: str = "eval") -> RunResult:
    """Compute a task's scores into the store (or report/resume the run that already has them)."""
    from .freezing import tracked_parameters
    from .options import options_to_dict, parse_options
    from .plugin_manager import lookup
    from .scoring import compute_scores

    started = time.perf_counter()
    if resume is not None:
        previous = store.run(resume)
        # The fingerprint hashes what was asked for (dtype None, chunk size None = automatic), not what it
        # resolved to, so resume from the stored request; runs stored without one fall back to the settings.
        asked = previous["settings"].get("requested") or {}
        if not isinstance(spec, Task):  # a Python caller resumes with its own Task object
            spec, task_options = previous["task_spec"], previous["task_options"]
        approximator, options = previous["approximator"], previous["options"]
        freeze, freeze_options = previous["freeze"], previous["freeze_options"]
        seed, device = previous["seed"], previous["device"]
        dtype = asked.get("dtype", previous["settings"]["dtype"])
        test_chunk_size = asked.get("test_chunk_size", previous["settings"]["test_chunk_size"])
        memory_budget_mb = asked.get("memory_budget_mb", memory_budget_mb)
        self_influence = asked.get("self_influence", self_influence)
        model_mode = asked.get("model_mode", "eval")
        model_version, dataset = previous["model_version"], previous["train_dataset"]
    if model_mode not in ("eval", "train"):
        raise InfluenceStoreError(f"unknown model mode {model_mode!r}; use eval or train")
    task = spec if isinstance(spec, Task) else load_task(spec, task_options)
    seconds_load = time.perf_counter() - started
    spec_text = _portable_spec(spec) if isinstance(spec, str) else f"<python object {task.name or 'Task'}>"
    dataset = dataset or task.name or "dataset"
    train_rows, test_rows = example_rows(task, "train"), example_rows(task, "test")
    weights = weights_sha256(task.model)
    parsed = options_to_dict(parse_options(lookup("register_approximators", approximator).options_cls, options,
                                           f"approximator {approximator!r}"))
    tracked = tracked_parameters(task.model, freeze, freeze_options)
    model_version = model_version or store.version_for_weights(weights) or f"model-{weights[:10]}"
    if not allow_removed:
        removed = store.removed_in_lineage(model_version)
        back = [r[0] for r in train_rows if (r[0], r[1]) in removed]
        if back:
            raise InfluenceStoreError(
                f"{len(back)} training examples of model version {model_version!r} were removed by applied proposals "
                f"(e.g. {back[0]!r}, proposal {removed[next(k for k in removed if k[0] == back[0])]['id']}); train on "
                f"the exported data, or pass --allow-removed to score them anyway")
    # Stored with the run, so --resume can rebuild the identity.
    requested = {"dtype": dtype, "test_chunk_size": test_chunk_size, "memory_budget_mb": memory_budget_mb,
                 "self_influence": self_influence, "model_mode": model_mode}
    identity = {
        "weights": weights, "model_version": model_version, "approximator": approximator, "options": parsed,
        "freeze": freeze, "freeze_options": freeze_options or {}, "tracked": tracked, "seed": seed,
        "device": str(device), "dtype": str(dtype), "l2": task.l2, "memory_budget_mb": memory_budget_mb,
        "test_chunk_size": test_chunk_size, "self_influence": self_influence, "dataset": dataset,
        **({"model_mode": model_mode} if model_mode != "eval" else {}),  # eval runs keep their old identity
        "train": hashlib.sha256(json.dumps([r[:2] for r in train_rows]).encode()).hexdigest(),
        "test": hashlib.sha256(json.dumps([r[:2] for r in test_rows]).encode()).hexdigest(),
    }
    fingerprint = hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()
    existing = store.run(resume) if resume is not None else store.find_run(fingerprint)
    if existing is not None and existing["settings_fingerprint"] != fingerprint:
        raise InfluenceStoreError(f"run {resume} cannot be resumed: its task, model or data changed since it "
                                  f"started; start a new run instead")
    if existing is not None and existing["status"] == "done":
        return RunResult(existing["id"], "done", "existing", time.perf_counter() - started)

    computation = compute_scores(task, approximator, options, freeze, freeze_options, device=device, seed=seed,
                                 dtype=dtype, memory_budget_mb=memory_budget_mb,
                                 test_chunk_size=existing["settings"]["test_chunk_size"] if existing else test_chunk_size,
                                 progress=progress, model_mode=model_mode)
    if existing is None:
        run_id = store.create_run(
            version_name=model_version, weights_sha256=weights, train_dataset=dataset,
            test_dataset=f"{dataset}/test", train_rows=train_rows, test_rows=test_rows,
            train_losses=computation.train_losses.tolist(), test_losses=computation.test_losses.tolist(),
            task_spec=spec_text, task_options=task_options or {},
            settings={**computation.settings, "requested": requested},
            settings_fingerprint=fingerprint, chunks_total=computation.num_chunks)
        status = store.run(run_id)["status"]  # not "pending" when another process created it first
        if status == "done":
            return RunResult(run_id, "done", "existing", time.perf_counter() - started)
        outcome = "computed" if status == "pending" else "resumed"
    else:
        run_id, outcome = existing["id"], "resumed"
    store.start_run(run_id)
    try:
        train_ids, test_ids = store.example_ids(run_id, "train"), store.example_ids(run_id, "test")
        # One writer thread stores chunk i while chunk i+1 is computed (torch releases the GIL), so
        # persistence hides behind computation. At most one chunk is in flight; a failure in either
        # thread stops the run, and a chunk already computed is still stored before it stops.
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="influence-store-writer") as writer:
            pending = None
            for chunk in computation.chunks(skip=store.done_chunks(run_id)):
                if pending is not None:
                    pending.result()
                pending = writer.submit(store.write_chunk, run_id, chunk.index,
                                        [test_ids[i] for i in chunk.test_indices], train_ids, chunk.scores.numpy())
            values = computation.self_influence().tolist() if self_influence else None
            if pending is not None:
                pending.result()
        if values is not None:
            store.write_self_influence(run_id, values)
    except BaseException as exc:
        reason = "interrupted" if isinstance(exc, KeyboardInterrupt) else str(exc) or type(exc).__name__
        store.fail_run(run_id, reason, time.perf_counter() - started)
        raise
    seconds = time.perf_counter() - started
    # Loading the task (importing a framework, reading data) is reported apart from computing its scores.
    computation.diagnostics.update(seconds_load=seconds_load, seconds_compute=seconds - seconds_load)
    store.finish_run(run_id, seconds, computation.diagnostics)
    return RunResult(run_id, "done", outcome, seconds)
