"""Writing output files so that a reader never sees half a file and a planted path cannot redirect it.

Each file is first written to a temporary file with an unpredictable name, created exclusively
(``O_EXCL``) in the target's own folder, then renamed over the target. A symlink or file someone
placed at a predictable ``NAME.tmp`` is never opened, and the rename replaces a link at the target
itself instead of writing through it. A target that exists and is not a regular file (a device, a FIFO,
a folder) is refused: the rename would replace it. The file gets the mode of the file it replaces, or
else the usual 0666 minus the umask (not the temporary file's private 0600).
"""

from __future__ import annotations

import os
import stat
import tempfile
from pathlib import Path

from .errors import InfluenceStoreError


def check_output_path(path: Path) -> None:
    """A file may be written at ``path``: its folder exists and is writable, and nothing but a regular
    file (or a link to one) is there."""
    folder = path.parent if str(path.parent) else Path(".")
    try:
        if not folder.is_dir():
            raise InfluenceStoreError(f"folder {str(folder)!r} does not exist; create it first")
        if path.exists() and not path.is_file():
            raise InfluenceStoreError(f"{str(path)!r} is not a regular file; choose a file path")
    except OSError as exc:  # e.g. a folder on the way that this user may not enter
        raise _cannot_write(path, exc) from None
    if not os.access(folder, os.W_OK):
        raise InfluenceStoreError(f"cannot write {str(path)!r}: folder {str(folder)!r} is not writable; "
                                  f"choose a writable folder")


def write_temp_beside(path: Path, text: str) -> Path:
    """``text`` in a new, exclusively created temporary file in ``path``'s folder; rename it into place
    with ``os.replace`` (or remove it) when done."""
    check_output_path(path)
    mode = stat.S_IMODE(path.stat().st_mode) if path.is_file() else 0o666 & ~_umask()
    try:
        fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as exc:
        raise _cannot_write(path, exc) from None
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
    except BaseException as exc:
        os.unlink(name)
        if isinstance(exc, OSError):
            raise _cannot_write(path, exc) from None
        raise
    return Path(name)


def write_atomic(path: Path, text: str) -> None:
    """Replace ``path`` with ``text`` in one rename."""
    tmp = write_temp_beside(path, text)
    try:
        os.replace(tmp, path)
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        if isinstance(exc, OSError):
            raise _cannot_write(path, exc) from None
        raise


def _cannot_write(path: Path, exc: OSError) -> InfluenceStoreError:
    return InfluenceStoreError(f"cannot write {str(path)!r}: {exc.strerror or exc}; choose a writable folder")


def _umask() -> int:
    mask = os.umask(0)  # the only way to read it is to set it: put it straight back
    os.umask(mask)
    return mask
