"""Run orchestration: task -> scores -> store, resumable and idempotent.

A run is identified by what determines its scores: the model's weights, the training and test
examples (keys + content hashes), the loss function's code (with the simple values it closes over, such
as a task option it reads), the approximator and its options, the freezing policy, seed, device and
dtype. Running the same thing again reports the stored run; a run that stopped midway resumes at its first
unfinished chunk.
"""

from __future__ import annotations

import functools
import hashlib
import json
import time
import types
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import Any, Callable

from . import collector
from .errors import InfluenceStoreError
from .phases import QUIET, Phases
from .leases import DEFAULT_LEASE_SECONDS, BlockLeases
from .schema import self_influence_block, self_influence_part
from .settings import RunSettings
from .store import Store
from .task import Task, example_rows, load_task
from .trust import portable_spec, stored_task


APPROXIMATOR_STATE = "approximator_state"  # the run artifact holding what the approximator fitted


def _digest(identity: dict) -> str:
    return hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()


def code_fingerprint(function: Any) -> str:
    """A digest of a loss function's code (bytecode, names, constants, nested functions) and of the simple
    values it closes over or defaults to, so that an edited loss starts a new run instead of reporting the
    old scores. The same in every process: nothing in it depends on addresses or hash seeds."""
    digest = hashlib.sha256()
    if isinstance(function, functools.partial):
        digest.update(repr((_simple(function.args), _simple(sorted(function.keywords.items())))).encode())
        function = function.func
    code = getattr(function, "__code__", None)
    if code is None:  # a callable object, e.g. an nn.Module loss: its forward or __call__
        method = getattr(type(function), "forward", None) or getattr(type(function), "__call__", None)
        code = getattr(method, "__code__", None)
        digest.update(type(function).__qualname__.encode())
    if code is not None:
        _digest_code(code, digest)
    cells = [cell.cell_contents for cell in getattr(function, "__closure__", None) or () if _filled(cell)]
    digest.update(repr(_simple(cells + list(getattr(function, "__defaults__", None) or ()))).encode())
    return digest.hexdigest()[:16]


def _digest_code(code: types.CodeType, digest: Any) -> None:
    digest.update(code.co_code + repr(code.co_names).encode())
    for constant in code.co_consts:
        if isinstance(constant, types.CodeType):
            _digest_code(constant, digest)
        else:
            digest.update(repr(_simple(constant)).encode())


def _simple(value: Any) -> Any:
    """Numbers, strings and their containers as they are; anything else by its type's name only."""
    if isinstance(value, (bool, int, float, str, bytes, type(None))):
        return value
    if isinstance(value, (tuple, list)):
        return [_simple(v) for v in value]
    if isinstance(value, frozenset):
        return sorted(repr(_simple(v)) for v in value)
    return type(value).__qualname__


def _filled(cell: Any) -> bool:
    try:
        cell.cell_contents
    except ValueError:  # a cell not yet assigned
        return False
    return True


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


def check_names(model_version: str | None, dataset: str | None) -> None:
    """Names a run cannot be stored under fail here, before anything is loaded or stored."""
    for what, name in (("model version", model_version), ("dataset", dataset)):
        if name is not None and not name.strip():
            raise InfluenceStoreError(f"{what} name is empty; give a name or leave it out for the default")


def _as_a_run(run: Callable) -> Callable:
    """``run`` computing with subnormal floats read as zero (``pieces.subnormals_flushed``) and the cycle
    collector paused while its task loads (``collector.py``); both are entered before torch is imported and the
    task loads, so that torch's threads inherit the first and the second covers those imports."""
    @functools.wraps(run)
    def as_a_run(*args: Any, **kwargs: Any) -> Any:
        with collector.paused_for_run():
            from .pieces import subnormals_flushed

            with subnormals_flushed():
                return run(*args, **kwargs)

    return as_a_run


@_as_a_run
def execute_run(store: Store, spec: str | Task, settings: RunSettings | None = None, *,
                task_options: dict | None = None, model_version: str | None = None, dataset: str | None = None,
                progress: bool = False, resume: int | None = None, allow_removed: bool = False,
                lease_seconds: float = DEFAULT_LEASE_SECONDS, workers: int | None = None,
                scheduler: str | None = None, phases: Phases | None = None, **setting_values: Any) -> RunResult:
    """Compute a task's scores into the store (or report/resume the run that already has them).

    ``settings`` (a ``RunSettings``) and keyword settings (``approximator="exact"``, ``options={...}``,
    ... any ``RunSettings`` field) say what to compute; a resumed run takes its stored settings instead.
    ``progress`` shows bars on a terminal; ``phases`` (e.g. ``Phases()``) names each long step on stderr.

    Processes that compute the same run share it: each claims blocks from the store (see leases.py).
    ``workers``/``scheduler`` run that loop on Dask workers instead of in this process (distributed.py).
    """
    settings = RunSettings.of(settings, **setting_values)
    if workers is not None or scheduler is not None:  # this process loads nothing: Dask workers do
        collector.loaded()
        from .distributed import execute_run_on_dask

        started = time.perf_counter()
        run_id, outcome = execute_run_on_dask(
            execute_run, store, spec, settings, workers=workers, scheduler=scheduler, task_options=task_options,
            model_version=model_version, dataset=dataset, resume=resume, allow_removed=allow_removed,
            lease_seconds=lease_seconds)
        return RunResult(run_id, "done", outcome, time.perf_counter() - started)
    from .freezing import tracked_parameters
    from .scoring import check_device, prepare_scores

    started = time.perf_counter()
    phases = phases or QUIET
    check_names(model_version, dataset)
    if resume is not None:
        previous = store.run(resume)
        if previous["status"] == "done" and not isinstance(spec, Task):  # nothing to compute: nothing to load
            if spec not in (None, "-"):
                stored_task(previous, spec, task_options)  # naming another task is still an error
            return RunResult(previous["id"], "done", "existing", time.perf_counter() - started)
        if not isinstance(spec, Task):  # a Python caller may resume with its own Task object
            spec, task_options = stored_task(previous, spec, task_options)
        settings = RunSettings.from_run(previous)
        model_version, dataset = previous["model_version"], previous["train_dataset"]
    settings = settings.resolved()  # an unknown approximator or a bad option fails before the task loads
    check_device(settings.device)
    if isinstance(spec, Task):
        task = spec
    else:
        with phases.step(f"loading task {spec}"):
            task = load_task(spec, task_options)
    collector.loaded()
    seconds_load = time.perf_counter() - started
    spec_text = portable_spec(spec) if isinstance(spec, str) else f"<python object {task.name or 'Task'}>"
    dataset = dataset or task.name or "dataset"
    train_rows, test_rows = example_rows(task, "train"), example_rows(task, "test")
    weights = weights_sha256(task.model)
    tracked = tracked_parameters(task.model, settings.freeze, settings.freeze_options)
    model_version = model_version or store.version_for_weights(weights) or f"model-{weights[:10]}"
    if not allow_removed:
        check_not_removed(store, model_version, train_rows)
    identity = {
        **settings.identity(), "weights": weights, "model_version": model_version, "tracked": tracked,
        "l2": task.l2, "dataset": dataset, "loss": code_fingerprint(task.loss),
        "train": hashlib.sha256(json.dumps([r[:2] for r in train_rows]).encode()).hexdigest(),
        "test": hashlib.sha256(json.dumps([r[:2] for r in test_rows]).encode()).hexdigest(),
    }
    fingerprint = _digest(identity)
    # Runs stored before the loss was part of the identity are found by the rest of it.
    earlier = _digest({k: v for k, v in identity.items() if k != "loss"})
    existing = store.run(resume) if resume is not None else store.find_run(fingerprint) or store.find_run(earlier)
    if existing is not None and existing["settings_fingerprint"] not in (fingerprint, earlier):
        raise InfluenceStoreError(f"run {resume} cannot be resumed: its task, model or data changed since it "
                                  f"started; start a new run instead")
    if existing is not None and existing["status"] == "done":
        return RunResult(existing["id"], "done", "existing", time.perf_counter() - started)

    state = store.artifact(existing["id"], APPROXIMATOR_STATE) if existing else None
    if existing is not None:  # its blocks are fixed: chunk size and self-influence parts from when it started
        computed_with = replace(settings, test_chunk_size=existing["settings"]["test_chunk_size"])
        parts = existing["settings"].get("self_influence_parts", 1)  # runs stored before parts: one
    else:
        computed_with, parts = settings, None
    with phases.step(f"preparing {settings.approximator} (losses, gradients, inverse-Hessian setup)"):
        computation = prepare_scores(task, computed_with, tracked=tracked, progress=progress,
                                     approximator_state=state, self_influence_parts=parts)
    if existing is None:
        run_id = store.create_run(
            version_name=model_version, weights_sha256=weights, train_dataset=dataset,
            test_dataset=f"{dataset}/test", train_rows=train_rows, test_rows=test_rows,
            train_losses=computation.train_losses.tolist(), test_losses=computation.test_losses.tolist(),
            task_spec=spec_text, task_options=task_options or {},
            settings={**computation.settings, "requested": settings.requested()},
            settings_fingerprint=fingerprint, chunks_total=computation.num_chunks)
        status = store.run(run_id)["status"]  # not "pending" when another process created it first
        if status == "done":
            return RunResult(run_id, "done", "existing", time.perf_counter() - started)
        outcome = "computed" if status == "pending" else "resumed"
    else:
        run_id, outcome = existing["id"], "resumed"
    fitted = computation.approximator.state() if state is None else None
    if fitted is not None:  # e.g. EK-FAC factors: a resumed run loads them instead of fitting again
        store.save_artifact(run_id, APPROXIMATOR_STATE, fitted)
    leases = BlockLeases(store, run_id, lease_seconds)
    store.start_run(run_id)
    blocks = list(range(computation.num_chunks)) + (
        [self_influence_block(part) for part in range(computation.self_influence_parts)]
        if settings.self_influence else [])
    store.add_blocks(run_id, blocks)
    try:
        step = f"scoring {computation.num_chunks} test chunks" + (" and self-influence" if settings.self_influence
                                                                  else "")
        with phases.step(step), leases:
            _compute_claimed_blocks(store, run_id, computation, leases)
    except BaseException as exc:
        # A process that joined a run and stops leaves it to the others still working on it (or done).
        if not store.run_workers(run_id) and store.run(run_id)["status"] != "done":
            reason = "interrupted" if isinstance(exc, KeyboardInterrupt) else str(exc) or type(exc).__name__
            store.fail_run(run_id, reason, time.perf_counter() - started)
        raise
    seconds = time.perf_counter() - started
    # Loading the task (importing a framework, reading data) is reported apart from computing its scores.
    computation.diagnostics.update(seconds_load=seconds_load, seconds_compute=seconds - seconds_load)
    store.complete_run(run_id, seconds, computation.diagnostics, settings.self_influence)
    return RunResult(run_id, "done", outcome, seconds)


def check_not_removed(store: Store, model_version: str, train_rows: list) -> None:
    """Training examples that an applied proposal removed in this version's lineage are not scored again
    unless asked for (``allow_removed``): the curated data set is what the version should train on."""
    removed = store.removed_in_lineage(model_version)
    back = [key for key, content, *_ in train_rows if (key, content) in removed]
    if back:
        proposal = removed[next(k for k in removed if k[0] == back[0])]["id"]
        raise InfluenceStoreError(
            "{count} training examples of model version {version!r} were removed by applied proposals "
            "(e.g. {key!r}, proposal {proposal}); train on the exported data, or pass {allow_removed} to score "
            "them anyway", count=len(back), version=model_version, key=back[0], proposal=proposal,
            allow_removed="allow_removed=True")


def _compute_claimed_blocks(store: Store, run_id: int, computation, leases: BlockLeases) -> None:
    """Compute and store every block this process claims, until no block of the run is left.

    One writer thread stores chunk i while chunk i+1 is computed (torch releases the GIL), so persistence
    hides behind computation. At most one chunk is in flight; a failure in either thread stops the run,
    and a chunk already computed is still stored before it stops.
    """
    from .scoring import _progress

    train_ids, test_ids = store.example_ids(run_id, "train"), store.example_ids(run_id, "test")

    def store_chunk(chunk) -> None:
        try:
            store.write_chunk(run_id, chunk.index, [test_ids[i] for i in chunk.test_indices], train_ids,
                              chunk.scores.numpy())
        except Exception:
            if chunk.index not in store.done_chunks(run_id):
                raise  # else another process, whose lease this one outlived, stored the same block first
        store.finish_block(run_id, chunk.index)

    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="influence-store-writer") as writer:
        pending = None
        groups = leases.blocks(grid=computation.chunk_grid)
        for group in _progress(groups, computation.progress, "block groups"):  # how many: up to the others
            chunks = [block for block in group if block >= 0]
            for chunk in computation.block_chunks(computation.chunk_grid(chunks[0]), chunks) if chunks else []:
                if pending is not None:
                    pending.result()
                pending = writer.submit(store_chunk, chunk)
            for block in (block for block in group if block < 0):  # a part of the self-influence
                part = self_influence_part(block)
                values = computation.self_influence_part(part).tolist()
                if pending is not None:
                    pending.result()
                # the same values from whoever computes them
                store.write_self_influence(run_id, values, start=computation.self_influence_range(part).start)
                store.finish_block(run_id, block)
        if pending is not None:
            pending.result()
