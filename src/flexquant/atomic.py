"""Atomic folder writes that survive a kill at any point (SIGKILL, power loss).

A folder ``NAME`` is written into a temporary sibling ``.NAME.tmp-PID-RAND`` (made with ``os.mkdir``, so its
mode follows the umask). When it is finished, every file in it and the folder itself are fsynced, and it is
renamed ``.NAME.new-PID-RAND``: from then on it counts as complete. An existing ``NAME`` is renamed to the
trash name ``.NAME.old-PID-RAND``, the new folder renamed to ``NAME``, the parent directory fsynced, and only
then the trash removed. Whatever step a kill interrupts, the old or the new folder is whole on disk, at
``NAME`` or under one of those names.

`recover` puts things right on the next run that targets ``NAME`` (`check_target`, `atomic_folder` and
`move_into_place` call it): if ``NAME`` is missing, a complete ``.new`` folder of a dead process (holding the
marker file) is renamed into place, else a trash folder of a dead process is renamed back; then the leftovers
of dead processes are removed. Leftovers of a live process (another save in progress) are never touched.
Other hidden siblings (the runner's ``.NAME.partial``, kept for ``--resume``) do not match these names."""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import re
import secrets
import shutil
from collections.abc import Iterator
from pathlib import Path

from .errors import FlexQuantError

log = logging.getLogger(__name__)

_KINDS = ("tmp", "new", "old")
_UNSUPPORTED_FSYNC = {errno.EINVAL, errno.ENOTSUP, errno.EBADF, getattr(errno, "EOPNOTSUPP", errno.ENOTSUP)}


def check_target(path: str | Path, overwrite: bool, marker: str, what: str) -> Path:
    """``path`` may be written: absent, or (with ``overwrite``) empty or a ``what`` (it holds ``marker``).

    An interrupted save of ``path`` by a process that is gone is first recovered (`recover`)."""
    path = Path(path)
    recover(path, marker)
    if path.is_symlink() and not path.exists():
        raise FlexQuantError(f"output folder {path} is a symlink to nothing; remove it or give another path")
    if path.exists() and not path.is_dir():
        raise FlexQuantError(f"output folder {path} is a file; give a folder path")
    if path.exists() and not overwrite:
        raise FlexQuantError(f"output folder {path} already exists; remove it or pass --overwrite")
    if path.exists() and not (path / marker).is_file() and any(path.iterdir()):
        raise FlexQuantError(f"refusing to overwrite {path}: it is not empty and not a {what}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise FlexQuantError(f"cannot create the folder {path.parent} for {path} ({e.strerror}); choose another "
                             "output path") from e
    probe = _sibling(path, "tmp", _token())  # a real write: os.access says yes to root on read-only or /proc
    try:
        probe.mkdir()
        probe.rmdir()
    except OSError as e:
        raise FlexQuantError(f"cannot write into {path.parent} ({e.strerror}); choose another output path") from e
    return path


def move_into_place(tmp: str | Path, path: str | Path, marker: str | None = None) -> None:
    """Rename the finished folder ``tmp`` to ``path``, replacing what is there only once ``tmp`` is complete
    and durable (fsynced). A kill at any point leaves the old or the new folder whole (see the module text);
    an error puts ``tmp`` and the old ``path`` back where they were."""
    tmp, path = Path(tmp), Path(path)
    recover(path, marker)
    follow_umask(tmp)
    sync_tree(tmp)
    token = _token()
    new = _sibling(path, "new", token)
    os.replace(tmp, new)  # from here on the new folder counts as complete
    old = None
    try:
        if path.exists() or path.is_symlink():
            old = _sibling(path, "old", token)
            os.replace(path, old)
        os.replace(new, path)
    except BaseException:
        _undo(tmp, new, path, old)
        raise
    _fsync(path.parent, folder=True)  # both renames are on disk before the old folder goes
    if old is not None:
        try:
            _remove(old)
        except OSError as e:
            log.warning("could not remove the replaced folder %s (%s); the next save of %s removes it",
                        old, e, path)


@contextlib.contextmanager
def atomic_folder(path: str | Path, overwrite: bool, marker: str, what: str) -> Iterator[Path]:
    """Yield a temporary folder beside ``path``; when the block ends without error it becomes ``path``.

    An existing ``path`` is replaced only with ``overwrite`` and only when it holds ``marker`` (the file that
    says it is a ``what``) or is empty; on error the temporary folder is removed and ``path`` is untouched."""
    path = check_target(path, overwrite, marker, what)
    tmp = temp_folder(path)
    try:
        yield tmp
        move_into_place(tmp, path, marker)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def temp_folder(path: str | Path) -> Path:
    """A new empty folder ``.NAME.tmp-PID-RAND`` beside ``path`` (mode from the umask, like ``mkdir``)."""
    path = Path(path)
    for _ in range(100):
        tmp = _sibling(path, "tmp", _token())
        try:
            os.mkdir(tmp)
            return tmp
        except FileExistsError:
            continue
    raise FlexQuantError(f"could not create a temporary folder beside {path}; check that folder")


def recover(path: str | Path, marker: str | None = None) -> None:
    """Finish or undo the interrupted saves of ``path`` by processes that are gone, then remove their
    leftovers. A ``.new`` folder is put in place only if it holds ``marker`` (when one is given)."""
    path = Path(path)
    pieces = _dead_pieces(path)
    if not pieces:
        return
    if not (path.exists() or path.is_symlink()):
        _restore(path, pieces, marker)
    for kind, pid, piece in pieces:
        if not (piece.exists() or piece.is_symlink()):
            continue
        what = {"tmp": "unfinished", "new": "superseded", "old": "replaced"}[kind]
        try:
            _remove(piece)
            log.warning("removed %s, the %s folder left by an interrupted save (process %d) of %s",
                        piece, what, pid, path)
        except OSError as e:
            log.warning("could not remove %s, left by an interrupted save (process %d) of %s: %s",
                        piece, pid, path, e)


def follow_umask(folder: str | Path) -> None:
    """Give every file under ``folder`` the mode a plain ``open`` would (some writers, such as safetensors,
    create their files readable by the owner only)."""
    mask = os.umask(0)
    os.umask(mask)
    for root, _dirs, files in os.walk(folder):
        for name in files:
            f = os.path.join(root, name)
            if not os.path.islink(f):
                os.chmod(f, 0o666 & ~mask)


def sync_tree(folder: str | Path) -> None:
    """fsync every file under ``folder``, every folder below it and ``folder`` itself (symlinks are skipped)."""
    for root, _dirs, files in os.walk(folder, topdown=False):
        for name in files:
            f = os.path.join(root, name)
            if not os.path.islink(f):
                _fsync(f)
        _fsync(root, folder=True)


# ----- helpers -----
def _token() -> str:
    return f"{os.getpid()}-{secrets.token_hex(4)}"


def _sibling(path: Path, kind: str, token: str) -> Path:
    return path.with_name(f".{path.name}.{kind}-{token}")


def _pattern(path: Path) -> re.Pattern:
    """``.NAME.KIND-PID-RAND``; the trash of older versions (``.NAME.old-PID``) has no random part."""
    return re.compile(rf"\.{re.escape(path.name)}\.(tmp|new|old)-(\d{{1,10}})(?:-([0-9a-f]+))?")


def _dead_pieces(path: Path) -> list[tuple[str, int, Path]]:
    """(kind, pid, folder) of the temporary, new and trash folders of ``path`` left by dead processes."""
    try:
        names = os.listdir(path.parent)
    except (FileNotFoundError, NotADirectoryError):
        return []
    pattern, found = _pattern(path), []
    for name in names:
        m = pattern.fullmatch(name)
        if m and (m.group(3) or m.group(1) == "old") and not alive(int(m.group(2))):
            found.append((m.group(1), int(m.group(2)), path.parent / name))
    return sorted(found, key=lambda p: p[2].name)


def alive(pid: int) -> bool:
    """Whether process ``pid`` may still be running (when unsure: yes, so that its folders are kept)."""
    if pid == os.getpid() or pid <= 0 or os.name == "nt":  # kill(pid, 0) terminates a process on Windows
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (OSError, OverflowError):  # PermissionError: it runs as another user
        return True
    return True


def _restore(path: Path, pieces: list[tuple[str, int, Path]], marker: str | None) -> None:
    """``path`` is missing: rename a complete new folder into place (the newest), else a trash folder back."""
    new = [(pid, p) for kind, pid, p in pieces if kind == "new" and p.is_dir()
           and (marker is None or (p / marker).is_file())]
    old = [(pid, p) for kind, pid, p in pieces if kind == "old"]
    for candidates, what in ((new, "the finished new folder"), (old, "the folder it was replacing")):
        for pid, piece in sorted(candidates, key=lambda c: _mtime(c[1], marker), reverse=True):
            try:
                os.replace(piece, path)
            except OSError:  # another process recovered it first, or put something at path
                continue
            _fsync(path.parent, folder=True)
            log.warning("recovered %s after a save interrupted by the end of process %d: %s (%s) was renamed "
                        "to it", path, pid, what, piece.name)
            return


def _mtime(folder: Path, marker: str | None) -> float:
    with contextlib.suppress(OSError):
        return (folder / marker).stat().st_mtime if marker else folder.stat().st_mtime
    with contextlib.suppress(OSError):
        return folder.stat().st_mtime
    return 0.0


def _undo(tmp: Path, new: Path, path: Path, old: Path | None) -> None:
    """After an error during the renames: the old folder back at ``path``, the new one back at ``tmp``."""
    with contextlib.suppress(OSError):
        if old is not None and os.path.lexists(old) and not os.path.lexists(path):
            os.replace(old, path)
    with contextlib.suppress(OSError):
        if os.path.lexists(new):
            os.replace(new, tmp)


def _remove(p: Path) -> None:
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p)
    else:
        p.unlink()


def _fsync(p: str | Path, folder: bool = False) -> None:
    """fsync one file or folder; filesystems that cannot fsync a folder (or at all) are let through."""
    if folder and os.name == "nt":  # Windows cannot open a folder to fsync it
        return
    fd = os.open(p, os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if folder else 0))
    try:
        os.fsync(fd)
    except OSError as e:
        if e.errno not in _UNSUPPORTED_FSYNC:
            raise
    finally:
        os.close(fd)
