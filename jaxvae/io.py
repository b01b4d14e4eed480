"""Atomic file output: write to a temporary name in the same folder, then rename.

A reader (or a crash) never sees a half-written file, and an existing file is only replaced
when the caller says so.
"""

import contextlib
import os
import tempfile
from pathlib import Path

from jaxvae.errors import OutputError


@contextlib.contextmanager
def atomic_path(path, *, overwrite: bool = False):
    """Yield a temporary path next to `path`; on success rename it onto `path`.

    Args:
      path: final file path.
      overwrite: allow replacing an existing file.

    Raises:
      OutputError: `path` exists and overwrite is False, or its folder is not writable.
    """
    path = Path(path)
    if path.exists() and not overwrite:
        raise OutputError(f"{path}: already exists (pass overwrite / --overwrite to replace it)")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        # keep the real suffixes (.nii.gz) so writers that dispatch on them still work
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp" + "".join(path.suffixes),
                                   dir=path.parent)
    except OSError as e:
        raise OutputError(f"{path}: cannot write here ({e.strerror})") from e
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def write_text(path, text: str, *, overwrite: bool = False) -> None:
    """Write a text file atomically (see `atomic_path`)."""
    with atomic_path(path, overwrite=overwrite) as tmp:
        Path(tmp).write_text(text)
