"""Imports every built-in command module so each attaches its commands to the root group."""

from . import curation_commands, plugin_commands, report_commands, review_commands, store_commands  # noqa: F401
from . import web_commands  # noqa: F401
