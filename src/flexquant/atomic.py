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


@contextlib.contextmanager
def atomic_folder(path: str | Path, overwrite: bool, marker: str, what: str) -> Iterator[Path]:
    """Yield a temporary folder beside ``path``; when the block ends without error it becomes ``path``.

    An existing ``path`` is replaced only with ``overwrite`` and only when it holds ``marker`` (the file that
    says it is a ``what``) or is empty; on error the temporary folder is removed and ``path`` is untouched."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise FlexQuantError(f"output folder {path} already exists; remove it or pass --overwrite")
    if path.exists() and not (path / marker).is_file() and any(path.iterdir()):
        raise FlexQuantError(f"refusing to overwrite {path}: it is not empty and not a {what}")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.tmp-"))
    try:
        yield tmp
        if path.exists():
            old = path.with_name(f".{path.name}.old-{os.getpid()}")
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
