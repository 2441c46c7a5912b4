"""Typed plugin options: conversion from CLI strings, unknown names, invalid values, help text."""

from dataclasses import dataclass
from typing import Literal

import pytest

from influence_store import InfluenceStoreError
from influence_store.options import describe_options, option, options_to_dict, parse_options
from influence_store.plugin_manager import lookup


@dataclass
class Example:
    steps: int = option(3, "how many")
    rate: float = option(0.5, "how fast")
    scale: float | str = option(1.0, "a number or 'auto'")
    depth: int | None = option(None, "optional")
    verbose: bool = option(False, "talk more")
    names: list[str] = option([], "repeatable")
    mode: Literal["fast", "exact"] = option("fast", "one of two")

    def __post_init__(self) -> None:
        if self.steps < 0:
            raise ValueError("steps must be >= 0")


def parse(**given):
    return parse_options(Example, given, "approximator 'example'")


def test_cli_strings_become_typed_values():
    parsed = parse(steps="7", rate="1e-3", scale="auto", depth="none", verbose="yes", names="a", mode="exact")
    assert parsed == Example(steps=7, rate=1e-3, scale="auto", depth=None, verbose=True, names=["a"], mode="exact")
    assert parse(scale="2.5").scale == 2.5 and parse(depth="4").depth == 4
    assert parse(names=["a", "b"]).names == ["a", "b"]
    assert parse(verbose="off").verbose is False


def test_defaults_are_fresh_per_instance():
    first, second = parse(), parse()
    first.names.append("x")
    assert second.names == []


@pytest.mark.parametrize("given, message", [
    ({"stpes": 3}, r"unknown option 'stpes' for approximator 'example'; valid options: steps, rate, scale, depth, "
                   r"verbose, names, mode"),
    ({"steps": "many"}, r"invalid value 'many' for option 'steps' of approximator 'example': expected int"),
    ({"steps": 2.5}, r"invalid value 2.5 for option 'steps'"),
    ({"rate": True}, r"invalid value True for option 'rate'.*expected float"),
    ({"verbose": "maybe"}, r"option 'verbose'.*expected bool"),
    ({"mode": "slow"}, r"option 'mode'.*expected 'fast' \| 'exact'"),
    ({"depth": "deep"}, r"option 'depth'.*expected int \| None"),
    ({"steps": -1}, r"invalid options for approximator 'example': steps must be >= 0"),
])
def test_bad_options_are_one_line_errors_that_list_what_is_valid(given, message):
    with pytest.raises(InfluenceStoreError, match=message) as info:
        parse(**given)
    assert "\n" not in str(info.value)


def test_options_without_fields_reject_everything():
    entry = lookup("register_freezing_policies", "all")
    with pytest.raises(InfluenceStoreError, match="unknown option 'x' for freezing policy 'all'; valid options: none"):
        parse_options(entry.options_cls, {"x": 1}, "freezing policy 'all'")


def test_an_options_instance_passes_through_and_round_trips():
    parsed = parse(steps=9)
    assert parse_options(Example, parsed, "x") is parsed
    assert parse(**options_to_dict(parsed)) == parsed


def test_describe_options_gives_types_defaults_and_help():
    info = {o.name: o for o in describe_options(Example)}
    assert (info["scale"].type, info["scale"].default, info["scale"].help) == ("float | str", 1.0, "a number or 'auto'")
    assert (info["depth"].type, info["names"].type, info["names"].default) == ("int | None", "list[str]", [])
    lissa = {o.name: o for o in describe_options(lookup("register_approximators", "lissa").options_cls)}
    assert [lissa[n].default for n in ("batch_size", "damping", "num_samples", "scale")] == [8, 3e-3, 1, 1e4]
    assert all(o.help for o in lissa.values())
