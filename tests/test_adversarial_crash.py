"""Atomic folder writes under kills at every step (flexquant.atomic): a save killed at any rename or at the removal
of the replaced folder leaves the old or the new folder whole, the next save (or `recover`) puts it at NAME and
leaves no hidden leftovers; leftovers of a live process are never touched; folders follow the umask; files and
folders are fsynced before the renames. Kills are real: a child process that calls ``os._exit`` at the chosen
call (no cleanup handler runs, as with SIGKILL)."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from flexquant.atomic import atomic_folder, check_target, recover
from flexquant.errors import FlexQuantError

SRC = Path(__file__).resolve().parents[1] / "src"
MARKER = "quant_config.json"

# The unit children import flexquant.atomic without flexquant/__init__.py (which imports torch: seconds each).
PRELUDE = f"""
import os, shutil, sys, types
from pathlib import Path
pkg = types.ModuleType("flexquant"); pkg.__path__ = [{str(SRC / "flexquant")!r}]; sys.modules["flexquant"] = pkg
from flexquant.atomic import atomic_folder, move_into_place

def kill_at(module, name, k):
    real, n = getattr(module, name), [0]
    def patched(*a, **kw):
        n[0] += 1
        if n[0] == k:
            os._exit(9)
        return real(*a, **kw)
    setattr(module, name, patched)
"""


def make(folder: Path, tag: str) -> Path:
    """A tiny 'checkpoint': the marker, a data file and a file in a subfolder, all saying ``tag``."""
    (folder / "sub").mkdir(parents=True, exist_ok=True)
    (folder / "data.bin").write_bytes(tag.encode() * 1000)
    (folder / "sub" / "x.txt").write_text(tag)
    (folder / MARKER).write_text(json.dumps({"tag": tag}))
    return folder


def tag_of(folder: Path) -> str | None:
    """The tag of a whole tiny checkpoint at ``folder``, None if it is missing or not whole."""
    try:
        tag = json.loads((folder / MARKER).read_text())["tag"]
        ok = (folder / "data.bin").read_bytes() == tag.encode() * 1000 and (folder / "sub/x.txt").read_text() == tag
    except (OSError, ValueError, KeyError):
        return None
    return tag if ok else None


def hidden(parent: Path, name: str = "q") -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith(f".{name}."))


def child(code: str, env: dict | None = None) -> int:
    """Run ``code`` (after the prelude) in a fresh Python; its exit status."""
    r = subprocess.run([sys.executable, "-c", PRELUDE + textwrap.dedent(code)], capture_output=True, text=True,
                       env=env, timeout=120)
    assert r.returncode in (0, 9), r.stderr
    return r.returncode


def killed_save(target: Path, module: str, name: str, k: int, overwrite: bool = True) -> int:
    """A child saving the tiny checkpoint 'new' at ``target``, killed at the ``k``-th call of module.name."""
    return child(f"""
        import json
        kill_at({module}, {name!r}, {k})
        with atomic_folder({str(target)!r}, {overwrite}, {MARKER!r}, "test") as tmp:
            (tmp / "sub").mkdir()
            (tmp / "data.bin").write_bytes(b"new" * 1000)
            (tmp / "sub" / "x.txt").write_text("new")
            (tmp / {MARKER!r}).write_text(json.dumps({{"tag": "new"}}))
    """)


def save(target: Path, tag: str, overwrite: bool = True) -> Path:
    with atomic_folder(target, overwrite, MARKER, "test") as tmp:
        make(tmp, tag)
    return target


def dead_pid() -> int:
    p = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return int(p.stdout)


# ----- kills at each step of a replacement (old at NAME) and of a first save -----
@pytest.mark.parametrize("module, name, k, right_after, recovered", [
    ("os", "replace", 1, "old", "old"),            # before tmp -> .new: the new folder is unfinished
    ("os", "replace", 2, "old", "old"),            # before NAME -> trash: the new folder is finished, NAME old
    ("os", "replace", 3, None, "new"),             # between the two renames: nothing at NAME
    ("shutil", "rmtree", 1, "new", "new"),         # before the trash is removed
])
def test_kill_while_replacing_loses_neither_folder(tmp_path, module, name, k, right_after, recovered, caplog):
    q = save(tmp_path / "q", "old")
    assert killed_save(q, module, name, k) == 9
    assert tag_of(q) == right_after
    assert hidden(tmp_path)  # the kill left pieces behind
    if right_after is None:
        assert {p.split("-")[0] for p in hidden(tmp_path)} == {".q.new", ".q.old"}
    with caplog.at_level(logging.WARNING, logger="flexquant.atomic"):
        recover(q, MARKER)
    assert tag_of(q) == recovered and hidden(tmp_path) == []
    assert "interrupted save" in caplog.text
    save(q, "third")  # the next save works as usual
    assert tag_of(q) == "third" and hidden(tmp_path) == []


@pytest.mark.parametrize("k, recovered", [(1, None), (2, "new")])
def test_kill_during_a_first_save(tmp_path, k, recovered):
    q = tmp_path / "q"
    assert killed_save(q, "os", "replace", k, overwrite=False) == 9
    assert not q.exists() and hidden(tmp_path)
    if recovered is None:  # an unfinished save: removed, the target stays free
        save(q, "third", overwrite=False)
        assert tag_of(q) == "third"
    else:  # the finished folder is put in place by the next run that targets q
        with pytest.raises(FlexQuantError, match="already exists"):
            check_target(q, False, MARKER, "test")
        assert tag_of(q) == "new"
    assert hidden(tmp_path) == []


def test_kill_while_writing_leaves_a_temp_folder_that_the_next_save_removes(tmp_path):
    q = save(tmp_path / "q", "old")
    child(f"""
        with atomic_folder({str(q)!r}, True, {MARKER!r}, "test") as tmp:
            (tmp / "half").write_text("x")
            os._exit(9)
    """)
    assert [n.split("-")[0] for n in hidden(tmp_path)] == [".q.tmp"] and tag_of(q) == "old"
    save(q, "new")
    assert tag_of(q) == "new" and hidden(tmp_path) == []


def test_runner_style_move_of_a_kept_folder_killed_between_the_renames(tmp_path):
    """The runner writes ``.q.partial`` itself and calls move_into_place without a marker."""
    q = save(tmp_path / "q", "old")
    partial = make(tmp_path / ".q.partial", "new")
    child(f"""
        kill_at(os, "replace", 3)
        move_into_place(Path({str(partial)!r}), Path({str(q)!r}))
    """)
    assert not q.exists() and not partial.exists()
    check_target(q, True, MARKER, "test")  # what the next run does first
    assert tag_of(q) == "new" and hidden(tmp_path) == []


# ----- errors (not kills): the process undoes its own steps -----
@pytest.mark.parametrize("k", [1, 2, 3])
def test_an_error_at_any_rename_keeps_the_old_folder_and_leaves_nothing(tmp_path, monkeypatch, k):
    q = save(tmp_path / "q", "old")
    real, n = os.replace, [0]

    def failing(*a, **kw):
        n[0] += 1
        if n[0] == k:
            raise OSError(28, "No space left on device")
        return real(*a, **kw)

    monkeypatch.setattr(os, "replace", failing)
    with pytest.raises(OSError, match="No space"):
        save(q, "new")
    assert tag_of(q) == "old" and hidden(tmp_path) == []


def test_a_failed_removal_of_the_old_folder_keeps_the_save(tmp_path, monkeypatch, caplog):
    q = save(tmp_path / "q", "old")

    def failing(*a, **kw):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr("shutil.rmtree", failing)
    with caplog.at_level(logging.WARNING, logger="flexquant.atomic"):
        save(q, "new")
    assert tag_of(q) == "new" and "could not remove the replaced folder" in caplog.text
    assert [n.split("-")[0] for n in hidden(tmp_path)] == [".q.old"]  # our own (live) leftover: kept for now
    monkeypatch.undo()
    old = tmp_path / hidden(tmp_path)[0]
    old.rename(tmp_path / f".q.old-{dead_pid()}-abcd")  # as after this process has ended
    save(q, "third")
    assert tag_of(q) == "third" and hidden(tmp_path) == []


def test_an_error_inside_the_block_keeps_the_old_folder(tmp_path):
    q = save(tmp_path / "q", "old")
    with pytest.raises(RuntimeError):
        with atomic_folder(q, True, MARKER, "test") as tmp:
            make(tmp, "new")
            raise RuntimeError("boom")
    assert tag_of(q) == "old" and hidden(tmp_path) == []


# ----- whose leftovers are removed -----
def test_leftovers_of_a_live_process_are_left_alone(tmp_path):
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        pieces = [make(tmp_path / f".q.{kind}-{pid}-00ff", "live") for pid in (sleeper.pid, os.getppid())
                  for kind in ("tmp", "new", "old")]
        q = tmp_path / "q"
        recover(q, MARKER)  # q missing, yet a live save is between its renames: wait for it
        assert not q.exists() and all(tag_of(p) == "live" for p in pieces)
        save(q, "mine", overwrite=False)
        assert tag_of(q) == "mine" and all(tag_of(p) == "live" for p in pieces)
    finally:
        sleeper.kill()
        sleeper.wait()
    pid = sleeper.pid  # now dead: its pieces go, those of our parent (alive) stay
    save(q, "again")
    assert [p.name for p in pieces if p.exists()] == [p.name for p in pieces if p.name.split("-")[1] != str(pid)]


def test_only_our_names_of_dead_processes_are_removed(tmp_path):
    q = save(tmp_path / "q", "old")
    pid = dead_pid()
    keep = [make(tmp_path / n, "x") for n in (".q.partial", ".q.tmp-abc123_x", ".qq.tmp-1-ab", ".q.backup",
                                               f".q.tmp-{pid}", f".other.tmp-{pid}-ab")]
    gone = [make(tmp_path / n, "x") for n in (f".q.tmp-{pid}-0a1b", f".q.new-{pid}-0a1b", f".q.old-{pid}-0a1b",
                                               f".q.old-{pid}")]
    (tmp_path / f".q.tmp-{pid}-0c0d").write_text("a file, not a folder")
    save(q, "new")
    assert tag_of(q) == "new" and all(p.exists() for p in keep) and not any(p.exists() for p in gone)
    assert not (tmp_path / f".q.tmp-{pid}-0c0d").exists()


def test_trash_of_older_versions_is_renamed_back(tmp_path):
    """flexquant before this change named the trash ``.NAME.old-PID``; killed between its renames, it is found."""
    make(tmp_path / f".q.old-{dead_pid()}", "old")
    q = tmp_path / "q"
    check_target(q, True, MARKER, "test")
    assert tag_of(q) == "old" and hidden(tmp_path) == []


def test_a_new_folder_without_the_marker_is_not_put_in_place(tmp_path):
    pid = dead_pid()
    make(tmp_path / f".q.old-{pid}-aa", "old")
    bad = make(tmp_path / f".q.new-{pid}-aa", "new")
    (bad / MARKER).unlink()
    q = tmp_path / "q"
    recover(q, MARKER)
    assert tag_of(q) == "old" and hidden(tmp_path) == []


# ----- permissions and durability -----
@pytest.mark.parametrize("mask, mode", [(0o022, 0o755), (0o027, 0o750)])
def test_folders_follow_the_umask(tmp_path, mask, mode):
    before = os.umask(mask)
    try:
        with atomic_folder(tmp_path / "a" / "q", False, MARKER, "test") as tmp:
            assert tmp.stat().st_mode & 0o777 == mode
            make(tmp, "new")
    finally:
        os.umask(before)
    assert (tmp_path / "a" / "q").stat().st_mode & 0o777 == mode
    assert (tmp_path / "a").stat().st_mode & 0o777 == mode


def test_everything_is_fsynced_before_the_renames_and_the_parent_after(tmp_path, monkeypatch):
    q = save(tmp_path / "q", "old")
    events, real_fsync, real_replace, real_rmtree = [], os.fsync, os.replace, __import__("shutil").rmtree

    def fsync(fd):
        events.append(("fsync", str(Path(os.readlink(f"/proc/self/fd/{fd}")).resolve())))
        return real_fsync(fd)

    def replace(a, b):
        events.append(("replace", str(Path(b).resolve())))
        return real_replace(a, b)

    def rmtree(p, *a, **kw):
        events.append(("rmtree", str(p)))
        return real_rmtree(p, *a, **kw)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    monkeypatch.setattr("shutil.rmtree", rmtree)
    with atomic_folder(q, True, MARKER, "test") as tmp:
        make(tmp, "new")
        inside = {str((tmp / r).resolve()) for r in ("", "sub", "data.bin", "sub/x.txt", MARKER)}
    first = next(i for i, e in enumerate(events) if e[0] == "replace")
    assert {p for kind, p in events[:first] if kind == "fsync"} == inside
    into_place = events.index(("replace", str(q.resolve())))
    removal = next(i for i, e in enumerate(events) if e[0] == "rmtree")
    assert ("fsync", str(tmp_path.resolve())) in events[into_place:removal]
    assert tag_of(q) == "new"


def test_check_target_still_refuses_what_it_refused(tmp_path):
    q = save(tmp_path / "q", "old")
    with pytest.raises(FlexQuantError, match="already exists"):
        check_target(q, False, MARKER, "test")
    other = tmp_path / "other"
    (other / "f").parent.mkdir()
    (other / "f").write_text("x")
    with pytest.raises(FlexQuantError, match="not empty and not a test"):
        check_target(other, True, MARKER, "test")
    assert check_target(tmp_path / "deep" / "new", False, MARKER, "test") == tmp_path / "deep" / "new"


# ----- end to end: real checkpoints written by quantize / save, killed at a rename -----
E2E = """
import os, re, sys
from pathlib import Path
import flexquant as fq
out, mode, stop = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
kw = dict(method="rtn", progress=False, plot=False, nsamples=8, seqlen=64)
if mode == "replace":
    fq.quantize("tiny-llama", bits=4, out=out, **kw)
if mode == "save":
    fq.save(fq.quantize("tiny-llama", bits=4, **kw), out, plot=False)
    qm = fq.quantize("tiny-llama", bits=3, **kw)
real = os.replace
def replace(src, dst):
    if re.fullmatch(stop, Path(dst).name):
        os._exit(9)
    return real(src, dst)
os.replace = replace
if mode == "save":
    fq.save(qm, out, overwrite=True, plot=False)
else:
    fq.quantize("tiny-llama", bits=3, out=out, overwrite=True, **kw)
"""


@pytest.fixture(scope="module")
def killed_runs(tmp_path_factory):
    """Two real overwrites of a 4-bit checkpoint by a 3-bit one, killed between the two renames (the old
    checkpoint in the trash, the new one finished beside it), run side by side: quantize(out=...,
    overwrite=True), which moves the runner's .partial folder into place, and save(..., overwrite=True)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "PYTHONPATH": str(SRC)}
    procs = {}
    for case in ("replace", "save"):
        out = tmp_path_factory.mktemp(case) / "q"
        procs[case] = (out, subprocess.Popen([sys.executable, "-c", E2E, str(out), case, "q"], env=env,
                                             stderr=subprocess.PIPE, text=True))
    for _, p in procs.values():
        assert p.wait(timeout=300) == 9, p.stderr.read()
    return {case: out for case, (out, _) in procs.items()}


def killed_state(out: Path) -> None:
    assert not out.exists()  # the old one is in the trash, the new one finished beside it
    assert sorted(n.split("-")[0] for n in hidden(out.parent)) == [".q.new", ".q.old"]


def test_e2e_quantize_overwrite_killed_between_the_renames_then_loads(killed_runs):
    import flexquant as fq

    out = killed_runs["replace"]
    killed_state(out)
    recover(out, MARKER)  # what the next run that targets out does first
    assert hidden(out.parent) == [] and fq.load(out).config.grid.bits == 3


def test_e2e_save_overwrite_killed_between_the_renames_then_a_normal_run(killed_runs):
    import flexquant as fq

    out = killed_runs["save"]
    killed_state(out)
    fq.quantize("tiny-llama", method="rtn", bits=2, out=out, overwrite=True, progress=False, plot=False,
                nsamples=8, seqlen=64)
    assert hidden(out.parent) == [] and fq.load(out).config.grid.bits == 2
