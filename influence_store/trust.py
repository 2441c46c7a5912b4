"""A store is data that people share, so nothing read from it is imported or executed on its own say-so.

A run records its task spec (``FILE.py:FUNCTION``, ``MODULE:FUNCTION``, ``LOADER:TARGET``) and task
options; loading them imports that code and calls it with those arguments. ``resume`` and ``verify``
therefore load a stored task only when the caller names the same spec (the CLI may also show it and ask).
"""

from __future__ import annotations

import json
from pathlib import Path

from .errors import InfluenceStoreError


class UntrustedTaskError(InfluenceStoreError):
    """The run's stored task would be loaded without the user naming it."""

    def __init__(self, run_id: int, spec: str, options: dict, named: str | None) -> None:
        self.run_id, self.spec, self.options, self.named = run_id, spec, options, named
        shown = f"task {spec!r}" + (f" with options {json.dumps(options)}" if options else "")
        if named is None:
            message = (f"run {run_id} was computed from {shown}; loading it imports and runs that code, and a store "
                       f"can come from anyone, so name the task to load it")
        else:
            message = f"run {run_id} was computed from {shown}, not {named!r}; name the run's own task to load it"
        super().__init__(message)


def portable_spec(spec: str) -> str:
    """A file spec with an absolute path (how runs record it), so a task can be loaded again from any folder."""
    where, sep, function = spec.rpartition(":")
    if sep and where.endswith(".py") and Path(where).is_file():
        return f"{Path(where).resolve()}:{function}"
    return spec


def stored_task(run: dict, named: str | None, options: dict | None = None) -> tuple[str, dict]:
    """The spec and options to load for a stored run: only when ``named`` is the run's own spec (and
    ``options``, when given, are its own options). ``None`` or ``'-'`` names nothing."""
    spec, stored_options = run["task_spec"], run.get("task_options") or {}
    if named in (None, "-"):
        raise UntrustedTaskError(run["id"], spec, stored_options, None)
    if named != spec and portable_spec(named) != spec:
        raise UntrustedTaskError(run["id"], spec, stored_options, named)
    if options and json.loads(json.dumps(options, default=str)) != stored_options:
        raise InfluenceStoreError(f"run {run['id']} was computed with task options {json.dumps(stored_options)}, "
                                  f"not {json.dumps(options, default=str)}; give the run's own options or none")
    return spec, stored_options
