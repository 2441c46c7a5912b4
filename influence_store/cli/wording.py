"""How the CLI spells the settings that core error messages name (see ``InfluenceStoreError``)."""

from __future__ import annotations

from ..errors import InfluenceStoreError

# setting named in a core message -> its flag or command, as a template over the error's facts
FLAGS = {
    "allow_removed": "--allow-removed",
    "device": "--device cpu",
}


def cli_message(exc: InfluenceStoreError) -> str:
    return exc.worded(FLAGS)
