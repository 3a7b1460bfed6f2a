"""Atomic folder writes: everything goes to a temporary sibling folder that is renamed into place, so an
interrupted save never leaves a half-written folder, and an existing one is replaced only when complete."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from .errors import FlexQuantError


def check_target(path: str | Path, overwrite: bool, marker: str, what: str) -> Path:
    """``path`` may be written: absent, or (with ``overwrite``) empty or a ``what`` (it holds ``marker``)."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise FlexQuantError(f"output folder {path} already exists; remove it or pass --overwrite")
    if path.exists() and not (path / marker).is_file() and any(path.iterdir()):
        raise FlexQuantError(f"refusing to overwrite {path}: it is not empty and not a {what}")
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def move_into_place(tmp: Path, path: Path) -> None:
    """Rename the finished folder ``tmp`` to ``path``, replacing what is there only once ``tmp`` is complete."""
    if path.exists():
        old = path.with_name(f".{path.name}.old-{os.getpid()}")
        os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, path)


@contextlib.contextmanager
def atomic_folder(path: str | Path, overwrite: bool, marker: str, what: str) -> Iterator[Path]:
    """Yield a temporary folder beside ``path``; when the block ends without error it becomes ``path``.

    An existing ``path`` is replaced only with ``overwrite`` and only when it holds ``marker`` (the file that
    says it is a ``what``) or is empty; on error the temporary folder is removed and ``path`` is untouched."""
    path = check_target(path, overwrite, marker, what)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.tmp-"))
    try:
        yield tmp
        move_into_place(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
