"""The one exception type users see: its message is a single line naming the problem and the fix."""


class InfluenceStoreError(Exception):
    """Bad input or an impossible request; the CLI prints it as one line and exits non-zero."""
