"""Writing output files so that a reader never sees half a file and a planted path cannot redirect it.

Each file is first written to a temporary file with an unpredictable name, created exclusively
(``O_EXCL``) in the target's own folder, then renamed over the target. A symlink or file someone
placed at a predictable ``NAME.tmp`` is never opened, and the rename replaces a link at the target
itself instead of writing through it.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def write_temp_beside(path: Path, text: str) -> Path:
    """``text`` in a new, exclusively created temporary file in ``path``'s folder; rename it into place
    with ``os.replace`` (or remove it) when done."""
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
    except BaseException:
        os.unlink(name)
        raise
    return Path(name)


def write_atomic(path: Path, text: str) -> None:
    """Replace ``path`` with ``text`` in one rename."""
    tmp = write_temp_beside(path, text)
    try:
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
