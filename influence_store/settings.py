"""A run's settings as one frozen value: checked once, stored with the run, rebuilt from it on resume.

Every setting is one field of ``RunSettings``. Its metadata says where the store keeps it (a column of
``runs`` or the ``requested`` settings) and how it enters the run's identity; the CLI's ``run`` options,
``execute_run`` and ``compute_scores`` keywords, the stored record and ``--resume`` all come from here.
Adding a setting is adding a field (docs/engine.md, "Adding a run setting").
"""

from __future__ import annotations

import math
import numbers
from dataclasses import MISSING, dataclass, field, fields, replace
from typing import Any

from .errors import InfluenceStoreError

ALWAYS = "always"  # in the identity with every value
UNLESS_DEFAULT = "unless-default"  # in the identity only when not the default: runs stored before keep theirs


def setting(default: Any, *, identity: str = UNLESS_DEFAULT, column: bool = False, flags: tuple[str, ...] = (),
            help: str = "", choices: tuple[str, ...] | None = None, type: type | None = None):
    """A RunSettings field. ``identity`` says when it enters the run's fingerprint (a setting added later
    uses UNLESS_DEFAULT, so runs stored before it was added keep their identity); ``column`` marks the
    settings the ``runs`` table has a column for (the rest are kept in its ``requested`` settings).
    ``flags``, ``help``, ``choices`` and ``type`` make its option of ``influence-store run`` (cli/run_options.py)."""
    metadata = {"identity": identity, "column": column, "flags": flags, "help": help, "choices": choices,
                "type": type}
    if isinstance(default, dict):
        return field(default_factory=dict, metadata=metadata)
    return field(default=default, metadata=metadata)


@dataclass(frozen=True)
class RunSettings:
    """What a run computes and how: the same settings give the same scores (and find the stored run)."""

    approximator: str = setting(
        "lissa", identity=ALWAYS, column=True, flags=("-a", "--approximator"),
        help="Inverse-HVP approximator (see `influence-store approximators --options`).")
    options: dict = setting(  # the approximator's; ``resolved()`` parses and completes them
        {}, identity=ALWAYS, column=True, flags=("-o", "--option"),
        help="Approximator option, repeatable: -o damping 0.01.")
    freeze: str = setting("all", identity=ALWAYS, column=True, flags=("--freeze",),
                          help="Freezing policy (see `influence-store policies`).")
    freeze_options: dict = setting(
        {}, identity=ALWAYS, column=True, flags=("-f", "--freeze-option"),
        help="Freezing-policy option, repeatable: -f patterns 'encoder.*'.")
    device: str = setting("cpu", identity=ALWAYS, column=True, flags=("--device",), help="cpu or cuda[:N].")
    seed: int = setting(0, identity=ALWAYS, column=True, flags=("--seed",), type=int,
                        help="Random seed of stochastic approximators (LiSSA's sampling); part of the run's identity.")
    dtype: str | None = setting(None, identity=ALWAYS, flags=("--dtype",), choices=("float32", "float64"),
                                help="Compute dtype (default: the model's).")
    memory_budget_mb: float | None = setting(
        None, identity=ALWAYS, flags=("--memory-budget-mb",), type=float,
        help="Memory the computation may hold (default: a quarter of the available memory); the plan printed "
             "before the run shows how it is used.")
    test_chunk_size: int | None = setting(None, identity=ALWAYS, flags=("--test-chunk-size",), type=int,
                                          help="Test examples per stored chunk.")
    self_influence: bool = setting(
        True, identity=ALWAYS, flags=("--no-self-influence",),
        help="Skip self-influence of training examples (it costs one inverse-HVP per training example).")
    model_mode: str = setting(
        "eval", flags=("--model-mode",), choices=("eval", "train"),
        help="Mode for training-example gradients: train keeps dropout on, as AllenNLP's SimpleInfluence "
             "(seeded by --seed, so runs repeat).")

    def __post_init__(self) -> None:
        self._check()

    @classmethod
    def of(cls, base: RunSettings | None = None, **values: Any) -> RunSettings:
        """``base`` (or the defaults) with ``values`` replaced; an unknown name is an error, not ignored."""
        unknown = sorted(set(values) - {f.name for f in fields(cls)})
        if unknown:
            raise TypeError(f"unknown run setting {unknown[0]!r}; run settings: {', '.join(names())}")
        return replace(base, **values) if base is not None else cls(**values)

    @classmethod
    def from_run(cls, run: dict) -> RunSettings:
        """The settings a stored run was asked for: columns of ``runs``, the rest from its ``requested``
        settings; a setting the run predates has its default, which is what that run used."""
        stored = run["settings"]
        asked = stored.get("requested") or {}
        values = {f.name: run[f.name] for f in fields(cls) if f.metadata["column"]}
        values.update(dtype=stored.get("dtype"), test_chunk_size=stored.get("test_chunk_size"))  # runs before
        values.update({f.name: asked[f.name] for f in fields(cls) if f.name in asked})
        return cls(**values)

    def approximator_plugin(self) -> tuple[Any, Any]:
        """The approximator's registry entry and its parsed options (unknown names and bad values fail here)."""
        from .options import parse_options
        from .plugin_manager import lookup

        entry = lookup("register_approximators", self.approximator)
        return entry, parse_options(entry.options_cls, self.options, f"approximator {self.approximator!r}")

    def resolved(self) -> RunSettings:
        """With the approximator's options parsed and completed, as they are stored and fingerprinted."""
        from .freezing import freezing_policy
        from .options import options_to_dict

        freezing_policy(self.freeze, self.freeze_options)  # a bad policy fails before the task loads
        return replace(self, options=options_to_dict(self.approximator_plugin()[1]))

    def requested(self) -> dict[str, Any]:
        """What the ``runs`` table has no column for, stored with the run so ``--resume`` can rebuild it."""
        return {f.name: getattr(self, f.name) for f in fields(self) if not f.metadata["column"]}

    def identity(self) -> dict[str, Any]:
        """This value's part of the run's fingerprint (the task, model and data add theirs in runs.py)."""
        out = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.metadata["identity"] == UNLESS_DEFAULT and value == default_of(f):
                continue
            out[f.name] = str(value) if f.name in ("device", "dtype") else value
        return out

    def _check(self) -> None:
        """Values a run cannot work with fail before anything is loaded or stored (never replaced silently)."""
        chunk, budget = self.test_chunk_size, self.memory_budget_mb
        if chunk is not None and (isinstance(chunk, bool) or not isinstance(chunk, numbers.Integral) or chunk < 1):
            raise InfluenceStoreError(f"test chunk size must be a positive number of test examples, got {chunk}")
        if budget is not None and (isinstance(budget, bool) or not isinstance(budget, (int, float))
                                   or not math.isfinite(budget) or budget <= 0):
            raise InfluenceStoreError(f"memory budget must be a positive number of MB, got {budget}")
        if self.model_mode not in ("eval", "train"):
            raise InfluenceStoreError(f"unknown model mode {self.model_mode!r}; use eval or train")
        for name in ("options", "freeze_options"):
            if not isinstance(getattr(self, name), dict):
                object.__setattr__(self, name, dict(getattr(self, name) or {}))


def names() -> list[str]:
    return [f.name for f in fields(RunSettings)]


def default_of(f) -> Any:
    """A RunSettings field's default value (a fresh one for dicts)."""
    return f.default_factory() if f.default_factory is not MISSING else f.default
