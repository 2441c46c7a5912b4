"""The one exception type users see: its message is a single line naming the problem and the fix."""

from __future__ import annotations

from collections.abc import Mapping


class InfluenceStoreError(Exception):
    """Bad input or an impossible request; the CLI prints it as one line and exits non-zero.

    Where the fix is a setting, the message names it as a placeholder and the keyword gives its Python
    spelling, so a notebook user reads Python and a shell user reads flags (the CLI rewords it):

        InfluenceStoreError("... or pass {allow_removed} to score them anyway", allow_removed="allow_removed=True")

    Every keyword is also a fact the CLI's wording may use (``{run_id}`` in ``--resume {run_id}``).
    """

    def __init__(self, message: str, /, **facts):
        self.template, self.facts = message, facts
        super().__init__(message.format(**facts) if facts else message)

    def worded(self, spelling: Mapping[str, str]) -> str:
        """The message with each setting it names spelled by ``spelling`` (templates over the facts)."""
        if not self.facts:
            return str(self)
        words = {name: template.format(**self.facts) for name, template in spelling.items() if name in self.facts}
        return self.template.format(**{**self.facts, **words})
