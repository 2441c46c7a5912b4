"""The freezing-policy interface: choose the parameters influence is computed over, by name.

A policy returns names; it never touches ``requires_grad`` or anything else on the user's model.
"""

from __future__ import annotations

from typing import Any, ClassVar

from .errors import InfluenceStoreError
from .options import NoOptions, parse_options


class FreezingPolicy:
    """Base class for freezing policy plugins."""

    name: ClassVar[str] = ""
    Options: ClassVar[type] = NoOptions

    def __init__(self, options: Any) -> None:
        self.options = options

    def tracked(self, model) -> list[str]:
        """Names (from ``model.named_parameters()``) of the parameters to track."""
        raise NotImplementedError


def freezing_policy(policy: str = "all", options: dict | None = None) -> FreezingPolicy:
    """The registered policy with its options parsed (an unknown policy or a bad option fails here)."""
    from .plugin_manager import lookup

    entry = lookup("register_freezing_policies", policy)
    return entry.cls(parse_options(entry.options_cls, options, f"freezing policy {policy!r}"))


def tracked_parameters(model, policy: str = "all", options: dict | None = None) -> list[str]:
    """Apply a registered policy; an empty or unknown selection is an error."""
    names = list(freezing_policy(policy, options).tracked(model))
    known = dict(model.named_parameters())
    # a shared (tied) parameter is listed once, under its first name: another name of it means that one
    canonical = {id(p): n for n, p in known.items()}
    aliases = {n: canonical[id(p)] for n, p in model.named_parameters(remove_duplicate=False)}
    unknown = [n for n in names if n not in aliases]
    if unknown:
        raise InfluenceStoreError(f"freezing policy {policy!r} returned unknown parameter names {unknown[:3]}")
    names = [aliases[n] for n in names]
    if not names and not any(p.requires_grad for p in known.values()):
        raise InfluenceStoreError("the model has no parameter with requires_grad=True; set requires_grad=True on "
                                  "the parameters to compute influence over")
    if not names:
        raise InfluenceStoreError("freezing policy {policy!r} leaves zero tracked parameters; loosen its options or "
                                  "use {freeze_all}", policy=policy, freeze_all='freeze="all"')
    order = {n: i for i, n in enumerate(known)}
    return sorted(dict.fromkeys(names), key=order.__getitem__)
