"""The ``run`` command's setting options, one per ``RunSettings`` field (settings.py declares them)."""

from __future__ import annotations

import functools
from dataclasses import MISSING, fields

import click

from ..settings import RunSettings


def pairs(values) -> dict:
    """``-o KEY VALUE`` pairs -> dict; a repeated key collects its values in a list (``-f patterns a -f patterns b``)."""
    out: dict = {}
    for key, value in values:
        if key in out:
            out[key] = (out[key] if isinstance(out[key], list) else [out[key]]) + [value]
        else:
            out[key] = value
    return out


def settings_options(function):
    """Give a command one option per run setting; ``function`` receives them as ``settings`` (a RunSettings)."""
    declared = [f for f in fields(RunSettings) if f.metadata["flags"]]

    @functools.wraps(function)
    def wrapper(**kwargs):
        values = {f.name: _from_option(f, kwargs.pop(f.name)) for f in declared}
        return function(settings=RunSettings(**values), **kwargs)

    for f in reversed(declared):  # the last option applied is listed first: keep the fields' order
        wrapper = click.option(*f.metadata["flags"], f.name, **_option(f))(wrapper)
    return wrapper


def _option(f) -> dict:
    meta, default = f.metadata, _default(f)
    if isinstance(default, dict):
        return {"type": (str, str), "multiple": True, "metavar": "KEY VALUE", "help": meta["help"]}
    if isinstance(default, bool):  # a setting that is on by default is switched off by its --no-... flag
        return {"is_flag": True, "help": meta["help"]}
    option = {"default": default, "help": meta["help"], "show_default": default is not None}
    if meta["choices"]:
        option["type"] = click.Choice(list(meta["choices"]))
    elif meta["type"] is not None:
        option["type"] = meta["type"]
    return option


def _from_option(f, value):
    default = _default(f)
    if isinstance(default, dict):
        return pairs(value)
    if isinstance(default, bool):
        return default != value  # the flag given means "not the default"
    return value


def _default(f):
    return f.default_factory() if f.default_factory is not MISSING else f.default
