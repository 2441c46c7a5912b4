"""The ``influence-store`` command line: a thin click shell over the Python API."""

from .main import main

__all__ = ["main"]
