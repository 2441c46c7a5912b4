"""The ``run`` command's setting options, one per ``RunSettings`` field (settings.py declares them)."""

from __future__ import annotations

import functools
from dataclasses import fields

import click
from click.core import ParameterSource

from ..settings import RunSettings, default_of
from .common import pairs


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
    meta, default = f.metadata, default_of(f)
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
    default = default_of(f)
    if isinstance(default, dict):
        return pairs(value)
    if isinstance(default, bool):
        return default != value  # the flag given means "not the default"
    return value


def options_given(context: click.Context, names: set[str]) -> list[str]:
    """The long flags of the options among ``names`` that the command line set."""
    return [max(p.opts, key=len) for p in context.command.params
            if p.name in names and context.get_parameter_source(p.name) is ParameterSource.COMMANDLINE]


def setting_names() -> set[str]:
    return {f.name for f in fields(RunSettings) if f.metadata["flags"]}
