"""Replacing a prepared data set without ever leaving a half-written one at its path.

`ms-ray prepare` writes the new set into a hidden sibling of the output (`.NAME.staging-PID`,
manifest last), then `swap_in` puts it in place: one atomic exchange of the two folders where
Linux allows it (renameat2 RENAME_EXCHANGE), else two renames through `.NAME.backup-PID`. The
output path therefore always holds the complete old set or the complete new one, whatever
kills the run; `recover` tidies what a killed run left (removes its staging folder, and puts
back its backup if it died between the two renames). Siblings of a prepare that is still
running (its pid is alive) are left alone, and recovery and swaps beside one output hold a
lock on the parent folder, so two prepares next to each other cannot undo each other's swap.

A folder is replaced only if it is ours: empty, or a data set with our manifest and nothing we
did not write (`check_output`); anything else is refused before a byte is touched.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import glob
import json
import os
import shutil
from pathlib import Path

from ..config import ConfigError
from ..manifest import MANIFEST, WRITTEN

AT_FDCWD, RENAME_EXCHANGE = -100, 2  # <fcntl.h>, <linux/fs.h>


class PrepareRefused(ConfigError):
    """`ms-ray prepare` will not start: the output or an input cannot be used as given. Raised
    before anything is read or written; one line naming the path and the fix. A ConfigError, so
    the CLI already reports it without a traceback, exit 2."""


class PrepareError(RuntimeError):
    """What was read is unusable (a source gave no examples or too many unknown tokens: the old
    set is left as it was), or too much input was dropped (the set was written). The message
    names the source or the reasons. Defined here beside PrepareRefused, not in pipeline.py, so
    that the CLI can name it at its top without importing torch (pipeline.py does)."""


def is_data_set(folder: Path) -> bool:
    """Whether `folder` holds a manifest written by `ms-ray prepare` (any format version)."""
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(manifest, dict) and "format_version" in manifest


def _shown(names: list[str], n: int = 3) -> str:
    return ", ".join(repr(x) for x in names[:n]) + (f" and {len(names) - n} more" if len(names) > n else "")


def check_output(out: Path, given: str) -> None:
    """Refuse an output that prepare could not replace without destroying something of the
    user's: a file, a path under a file, or a non-empty folder that is not purely our data set."""
    existing = next(p for p in (out, *out.parents) if p.exists())
    if not existing.is_dir():
        raise PrepareRefused(f"output={given}: {existing} is a file, not a folder; choose another output")
    if existing != out:
        return  # to be created
    names = sorted(p.name for p in out.iterdir())
    if not names:
        return
    if not is_data_set(out):
        raise PrepareRefused(
            f"output={given} is a folder that is not a data set of ms-ray prepare (no {MANIFEST}; it holds "
            f"{_shown(names)}); prepare replaces the whole folder, so choose a new or empty output")
    extra = [x for x in names if x not in WRITTEN]
    if extra:
        raise PrepareRefused(
            f"output={given} is a data set but also holds {_shown(extra)}, which prepare did not write and "
            f"would delete with the old set; move them out or choose another output")


def sibling(out: Path, kind: str, pid: int | None = None) -> Path:
    """`.NAME.staging-PID` / `.NAME.backup-PID` beside `out`: same file system, so renames are
    atomic; hidden, so a listing of the parent stays clean; the pid tells whose it is."""
    return out.parent / f".{out.name}.{kind}-{os.getpid() if pid is None else pid}"


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return False  # an earlier prepare in this process, which has ended
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's live process
    return True


@contextlib.contextmanager
def parent_lock(folder: Path):
    """An exclusive flock on the output's parent folder: the kernel drops it when the holder
    dies, so a killed prepare never leaves it locked."""
    import fcntl

    fd = os.open(folder, os.O_RDONLY)
    try:
        with contextlib.suppress(OSError):  # a file system without flock: go on unlocked
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:  # removed meanwhile by its own run
        return 0.0


def recover(out: Path, say=print) -> None:
    """Tidy what killed prepares left beside `out` (call under `parent_lock`). Backups first: a
    run killed between the two renames of a fallback swap left `out` missing and the old set as
    its backup, which goes back in place; every other leftover of a dead run is removed."""
    if not out.parent.is_dir():
        return
    for kind in ("backup", "staging"):
        pattern = f".{glob.escape(out.name)}.{kind}-*"
        for leftover in sorted(out.parent.glob(pattern), key=_mtime, reverse=True):  # newest backup first
            try:
                pid = int(leftover.name.rsplit("-", 1)[1])
            except ValueError:
                continue  # not a name we write: not ours to touch
            if _pid_alive(pid):
                continue  # a prepare that is still running
            if kind == "backup" and not out.exists() and is_data_set(leftover):
                os.rename(leftover, out)
                say(f"prepare: put back {out} from {leftover.name}, left by a run killed while swapping")
            else:
                shutil.rmtree(leftover, ignore_errors=True)


def exchange(a: Path, b: Path) -> bool:
    """Swap two existing paths in one atomic step (Linux renameat2 RENAME_EXCHANGE); False where
    the C library or the file system cannot, and the caller falls back to two renames."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if renameat2(AT_FDCWD, os.fsencode(a), AT_FDCWD, os.fsencode(b), RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def swap_in(staging: Path, out: Path, given: str) -> None:
    """Put the complete set in `staging` at `out` (call under `parent_lock`). At every instant
    `out` is the old set or the new one, except between the fallback's two renames, which
    `recover` repairs."""
    if not out.exists():
        os.rename(staging, out)
        return
    check_output(out, given)  # something may have been put there since the run started
    if exchange(staging, out):
        shutil.rmtree(staging)  # which now holds the old set
        return
    backup = sibling(out, "backup")
    os.rename(out, backup)
    os.rename(staging, out)
    shutil.rmtree(backup)
