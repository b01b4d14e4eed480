"""Atomic file output: write to a temporary name in the same folder, then rename.

A reader (or a crash) never sees a half-written file, and an existing file is only replaced
when the caller says so. After a SIGKILL a hidden `.<name>.<random>.tmp...` file may remain:
it is never mistaken for an output (hidden, and folder scans skip dot-files) and is not
removed automatically, since it could belong to another process writing the same folder.
"""

import contextlib
import os
import tempfile
from pathlib import Path

from jaxvae.base.errors import OutputError


def refuse_existing(paths, *, overwrite: bool = False) -> None:
    """The one check before writing: OutputError naming the first of `paths` that exists,
    unless `overwrite`. Callers run it before slow work, so nothing is computed in vain."""
    if overwrite:
        return
    for p in paths:
        if Path(p).exists():
            raise OutputError(f"{p}: already exists (use --overwrite to replace it)")


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
    refuse_existing([path], overwrite=overwrite)
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
        # mkstemp creates 0600; give the file the mode a plain open() would (0666 - umask)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def confined(out_dir, name: str) -> Path:
    """`out_dir / name`, refusing a name that would land outside `out_dir`.

    Output names are built from data (volume file stems, case IDs, predictor names); a name
    such as `../x` or `/etc/x`, or a symlink leading out, must not write elsewhere.

    Raises:
      OutputError: `name` is empty, has a path separator or is `.`/`..`, or the path
        resolves outside `out_dir`.
    """
    out_dir = Path(out_dir)
    seps = [s for s in (os.sep, os.altsep) if s]
    if name in ("", ".", "..") or any(s in name for s in seps) or "\0" in name:
        raise OutputError(f"{out_dir}: refusing output name {name!r}: it must be a plain file "
                          "name inside the output folder")
    path = out_dir / name
    if not path.resolve().is_relative_to(out_dir.resolve()):
        raise OutputError(f"{path}: resolves to {path.resolve()}, outside the output folder "
                          f"{out_dir.resolve()}; refusing to write there")
    return path


def check_out_dir(out_dir) -> Path:
    """Refuse up front (before minutes of work) an output folder that cannot be created.

    Raises:
      OutputError: `out_dir`, or the nearest of its parents that exists, is not a folder.
    """
    out_dir = Path(out_dir)
    for p in (out_dir, *out_dir.absolute().parents):
        if p.exists():
            if not p.is_dir():
                what = "is a file" if p == out_dir else f"cannot be created: {p} is a file"
                raise OutputError(f"{out_dir}: output folder {what}, not a folder")
            break
    return out_dir


@contextlib.contextmanager
def all_or_nothing(paths):
    """Remove the files among `paths` that this block created, if the block fails.

    A set of outputs that belong together (the maps of one volume, results.json + .md) is
    then either complete or absent after an error or Ctrl-C; files that existed before are
    left alone. (Only SIGKILL can still stop it half-way: each file written is complete.)
    """
    new = [Path(p) for p in paths if not os.path.lexists(p)]
    try:
        yield
    except BaseException:
        for p in new:
            with contextlib.suppress(OSError):
                p.unlink()
        raise


def write_text(path, text: str, *, overwrite: bool = False) -> None:
    """Write a text file atomically (see `atomic_path`)."""
    with atomic_path(path, overwrite=overwrite) as tmp:
        Path(tmp).write_text(text)
