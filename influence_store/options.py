"""Typed plugin options: a dataclass per plugin, filled from Python values or CLI strings.

Every plugin kind (approximator, freezing policy, proposal rule, task loader) declares an ``Options``
dataclass whose fields carry a default and help text; ``parse_options`` turns user input into it and
rejects unknown names, so a typo never silently falls back to a default.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from typing import Any, Mapping

from .errors import InfluenceStoreError


def option(default: Any, help: str) -> Any:
    """A dataclass field with a default and the help text the CLI prints."""
    if isinstance(default, list):
        return dataclasses.field(default_factory=lambda: list(default), metadata={"help": help})
    return dataclasses.field(default=default, metadata={"help": help})


@dataclasses.dataclass
class NoOptions:
    """For plugins that take no options."""


@dataclasses.dataclass(frozen=True)
class OptionInfo:
    name: str
    type: str
    default: Any
    help: str


def describe_options(options_cls: type) -> list[OptionInfo]:
    """Name, type, default and help text of every option, for listings."""
    hints = typing.get_type_hints(options_cls)
    infos = []
    for f in dataclasses.fields(options_cls):
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
        infos.append(OptionInfo(f.name, _type_name(hints[f.name]), default, f.metadata.get("help", "")))
    return infos


def parse_options(options_cls: type, given: Mapping[str, Any] | None, owner: str) -> Any:
    """Build ``options_cls`` from ``given``; strings are converted to each field's type."""
    if isinstance(given, options_cls):
        return given
    given = dict(given or {})
    hints = typing.get_type_hints(options_cls)
    names = [f.name for f in dataclasses.fields(options_cls)]
    unknown = sorted(set(given) - set(names))
    if unknown:
        valid = ", ".join(names) if names else "none"
        raise InfluenceStoreError(
            f"unknown option {', '.join(map(repr, unknown))} for {owner}; valid options: {valid}")
    values = {}
    for name, raw in given.items():
        try:
            values[name] = _convert(raw, hints[name])
        except (TypeError, ValueError):
            raise InfluenceStoreError(
                f"invalid value {raw!r} for option {name!r} of {owner}: expected {_type_name(hints[name])}"
            ) from None
    try:
        return options_cls(**values)
    except (TypeError, ValueError) as exc:
        raise InfluenceStoreError(f"invalid options for {owner}: {exc}") from None


def options_to_dict(options: Any) -> dict[str, Any]:
    """JSON-ready dict of an options instance, for provenance records."""
    return dataclasses.asdict(options)


def _convert(raw: Any, annotation: Any) -> Any:
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        members = typing.get_args(annotation)
        if raw is None or (isinstance(raw, str) and raw.lower() in ("none", "null")):
            if type(None) in members:
                return None
        for member in members:
            if member is type(None):
                continue
            try:
                return _convert(raw, member)
            except (TypeError, ValueError):
                continue
        raise ValueError(raw)
    if origin is typing.Literal:
        if raw in typing.get_args(annotation):
            return raw
        raise ValueError(raw)
    if origin in (list, tuple):
        (item,) = typing.get_args(annotation)[:1] or (str,)
        items = [raw] if isinstance(raw, (str, int, float)) else list(raw)
        return [_convert(x, item) for x in items]
    if annotation is bool:
        if isinstance(raw, bool):
            return raw
        text = str(raw).lower()
        if text in ("1", "true", "yes", "on"):
            return True
        if text in ("0", "false", "no", "off"):
            return False
        raise ValueError(raw)
    if annotation is int:
        if isinstance(raw, bool) or (isinstance(raw, float) and not raw.is_integer()):
            raise ValueError(raw)
        return int(raw)
    if annotation is float:
        if isinstance(raw, bool):
            raise ValueError(raw)
        value = float(raw)
        if not math.isfinite(value):  # NaN or infinity is never a usable setting
            raise ValueError(raw)
        return value
    if annotation is str:
        if not isinstance(raw, str):
            raise TypeError(raw)
        return raw
    return raw


def _type_name(annotation: Any) -> str:
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        return " | ".join(_type_name(a) for a in typing.get_args(annotation))
    if origin is typing.Literal:
        return " | ".join(repr(a) for a in typing.get_args(annotation))
    if origin in (list, tuple):
        return f"list[{_type_name(typing.get_args(annotation)[0])}]"
    if annotation is type(None):
        return "None"
    return getattr(annotation, "__name__", str(annotation))
