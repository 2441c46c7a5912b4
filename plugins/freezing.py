"""Built-in freezing policies: all, regex (AllenNLP params_to_freeze), last-layer, modules."""

from __future__ import annotations

import re
from dataclasses import dataclass

from influence_store.freezing import FreezingPolicy
from influence_store.hookspecs import hookimpl
from influence_store.options import option


class All(FreezingPolicy):
    """Track every parameter that requires grad."""

    name = "all"

    def tracked(self, model):
        return [n for n, p in model.named_parameters() if p.requires_grad]


class Regex(FreezingPolicy):
    """Freeze parameters whose name matches any pattern with re.match (AllenNLP params_to_freeze)."""

    name = "regex"

    @dataclass
    class Options:
        patterns: list[str] = option([], "regular expressions; a name matching any (re.match) is frozen")

        def __post_init__(self) -> None:
            for pattern in self.patterns:
                try:
                    re.compile(pattern)
                except re.error as exc:
                    raise ValueError(f"pattern {pattern!r} is not a valid regular expression: {exc}") from None

    def tracked(self, model):
        names = [n for n, _ in model.named_parameters()]
        unmatched = [pat for pat in self.options.patterns if not any(re.match(pat, n) for n in names)]
        if unmatched:  # a typo would otherwise freeze nothing, silently
            from influence_store.errors import InfluenceStoreError

            raise InfluenceStoreError(f"freezing pattern {unmatched[0]!r} matches no parameter name (re.match from "
                                      f"the start); names look like: {', '.join(names[:4])}")
        return [n for n, p in model.named_parameters()
                if p.requires_grad and not any(re.match(pat, n) for pat in self.options.patterns)]


class LastLayer(FreezingPolicy):
    """Track only the parameters of the last module (in definition order) that owns parameters."""

    name = "last-layer"

    def tracked(self, model):
        owners = [(name, module) for name, module in model.named_modules()
                  if any(p.requires_grad for p in module.parameters(recurse=False))]
        if not owners:
            return []
        prefix, module = owners[-1]
        return [f"{prefix}.{n}" if prefix else n for n, p in module.named_parameters(recurse=False)
                if p.requires_grad]


class Modules(FreezingPolicy):
    """Track only the parameters inside the named modules (e.g. -f names encoder -f names head)."""

    name = "modules"

    @dataclass
    class Options:
        names: list[str] = option([], "module names (as in model.named_modules()) whose parameters are tracked")

        def __post_init__(self) -> None:
            if not self.names:
                from influence_store.errors import InfluenceStoreError

                raise InfluenceStoreError("freezing policy 'modules' needs at least one module name, e.g. "
                                          "{module_names}", module_names='freeze_options={"names": ["classifier"]}')

    def tracked(self, model):
        modules = dict(model.named_modules())
        missing = [n for n in self.options.names if n not in modules]
        if missing:
            from influence_store.errors import InfluenceStoreError

            available = ", ".join(n for n in modules if n) or "none"
            raise InfluenceStoreError(f"model has no module named {missing[0]!r}; modules: {available}")
        prefixes = tuple(f"{n}." for n in self.options.names if n)
        return [n for n, p in model.named_parameters()
                if p.requires_grad and ("" in self.options.names or n.startswith(prefixes))]


@hookimpl
def register_freezing_policies(register):
    for policy in (All, Regex, LastLayer, Modules):
        register(policy)
