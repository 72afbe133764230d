"""Publishing an engine directory: `out` shows the complete old engine or the complete new one, never a mix.

The protocol (each step is one system call, so a kill between any two leaves a state listed here):

1. `stage(out)`: the export writes into a sibling `.NAME.partial-<pid>-<random>` (same filesystem, so the
   final rename is atomic). A kill here: `out` untouched, the partial is debris.
2. `commit()`: fsync every file, then the directory, so what the rename publishes is on disk.
3. `out` absent: rename(partial, out) (RENAME_NOREPLACE where available) — `out` appears whole.
   `out` exists (an engine, or an empty directory): renameat2(RENAME_EXCHANGE) swaps the two names in one
   step — `out` is the new engine, the partial's name holds the old one, which is then removed.
   Where renameat2 is missing (not Linux, old libc, a filesystem without it) the fallback moves the old
   engine aside to `.NAME.old-<pid>-<random>` and renames the partial into place: for that instant `out`
   is absent, but the old engine is kept until the new one is in place, and `sweep()` puts it back if the
   process dies in between.
4. fsync the parent directory, so the rename itself survives a power cut.

SIGINT/SIGTERM arriving during the renames are held until they are done. SIGKILL cannot be held:
`sweep()`, run by the next export of the same `out`, removes the siblings whose PID is no longer alive
(and restores a moved-aside old engine if `out` is missing); siblings of a live export are left alone.
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import re
import secrets
import shutil
import signal
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from runtime import artifact

FAULT_ENV = "MESA_EXPORT_FAULT"
AT_FDCWD, RENAME_NOREPLACE, RENAME_EXCHANGE = -100, 1, 2


def fault(point: str) -> None:
    """Testing only (tests/test_export_safety.py, test_export.py): MESA_EXPORT_FAULT=<point>[:TERM|:WAIT]
    makes the process SIGKILL (or SIGTERM) itself when it reaches `point`, to prove what a crash there
    leaves, or (WAIT) say so on stderr and sleep, for a test to interrupt it there. Points: the start of
    each export stage (load, trace, passes, save, verify) and the commit.* steps below."""
    name, _, sig = os.environ.get(FAULT_ENV, "").partition(":")
    if name == point and sig == "WAIT":
        print(f"export paused at {point}", file=sys.stderr, flush=True)
        time.sleep(600)
    elif name == point:
        os.kill(os.getpid(), signal.SIGTERM if sig == "TERM" else signal.SIGKILL)


def is_engine(path: Path) -> bool:
    """A directory with a readable manifest of our format: something an export wrote."""
    try:
        return json.loads((Path(path) / artifact.MANIFEST).read_text()).get("format") == artifact.FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def replaceable(path: Path) -> bool:
    """What --force may replace: an engine or an empty directory, never anything else."""
    path = Path(path)
    return path.is_dir() and not path.is_symlink() and (is_engine(path) or not any(path.iterdir()))


# ------------------------------------------------------------------------------------ siblings

def _sibling(out: Path, kind: str) -> Path:
    return out.with_name(f".{out.name}.{kind}-{os.getpid()}-{secrets.token_hex(4)}")


def _siblings(out: Path) -> list[tuple[Path, str, int]]:
    """(path, kind, pid) of the partial/old siblings of `out`, old ones first."""
    pattern = re.compile(rf"^\.{re.escape(out.name)}\.(partial|old)-(\d+)-[0-9a-f]+$")
    found = [(p, m.group(1), int(m.group(2))) for p in out.parent.iterdir() if (m := pattern.match(p.name))] \
        if out.parent.is_dir() else []
    return sorted(found, key=lambda f: f[1] != "old")


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        for child in list(path.iterdir()):
            _remove(child)
            fault("commit.cleaning")  # after each entry of a directory being removed
        path.rmdir()
    elif os.path.lexists(path):
        path.unlink()


def sweep(out: Path) -> list[str]:
    """Clean up after exports of `out` that died (SIGKILL, power cut); returns one line per action."""
    out = Path(out)
    removed, lines = [], []
    for path, kind, pid in _siblings(out):
        if _alive(pid):
            continue
        try:
            if kind == "old" and not os.path.lexists(out) and is_engine(path):
                path.rename(out)  # the fallback commit died between its two renames: the old engine comes back
                lines.append(f"restored {out} from {path.name}, left by export process {pid} that died replacing it")
            else:
                shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()
                removed.append(path.name)
        except OSError as e:  # debris we cannot remove must not stop this export
            lines.append(f"warning: cannot clean up {path}: {e}")
    if removed:
        lines.append(f"removed {len(removed)} leftover(s) of dead exports of {out}: {', '.join(removed)}")
    return lines


# --------------------------------------------------------------------------------------- commit

@dataclass
class Staging:
    out: Path
    path: Path  # the partial; after an exchange, the old engine being removed
    ident: tuple[int, int]  # (st_dev, st_ino) of the partial: renames keep it, so it says where it went
    leftovers: list[Path] = field(default_factory=list)

    def published(self) -> bool:
        """True when `out` is this staging directory, i.e. the new engine is what `out` shows."""
        try:
            st = os.stat(self.out)
        except OSError:
            return False
        return (st.st_dev, st.st_ino) == self.ident

    def discard(self) -> None:
        """Remove what this export leaves beside `out`: an unpublished partial or a replaced old engine."""
        for path in (self.path, *self.leftovers):
            try:
                _remove(path)
            except OSError:  # what stays is debris with our PID in its name: the next sweep() takes it
                pass


def stage(out: Path) -> Staging:
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    path = _sibling(out, "partial")
    path.mkdir()
    st = path.stat()
    return Staging(out, path, (st.st_dev, st.st_ino))


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _sync_tree(path: Path) -> None:
    for root, _, files in os.walk(path, topdown=False):  # each directory after its files
        for name in files:
            _fsync(Path(root) / name)
        _fsync(Path(root))


try:
    _renameat2 = ctypes.CDLL(None, use_errno=True).renameat2  # glibc >= 2.28
    _renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
except (AttributeError, OSError, TypeError):
    _renameat2 = None


def _rename2(src: Path, dst: Path, flags: int) -> bool:
    """renameat2(2); False where the libc or the filesystem does not offer it (the caller falls back)."""
    if _renameat2 is None:
        return False
    if _renameat2(AT_FDCWD, os.fsencode(src), AT_FDCWD, os.fsencode(dst), flags) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(dst))


@contextmanager
def _signals_held():
    """SIGINT/SIGTERM during the renames are re-raised after them: an interrupt never stops the commit
    between two of its steps (a per-thread sigmask would not do: any thread may take the signal)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pending = []
    held = {s: signal.signal(s, lambda signum, frame: pending.append(signum)) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, handler in held.items():
            signal.signal(s, handler)
        for s in pending:
            signal.raise_signal(s)


def commit(staging: Staging, force: bool) -> None:
    """Publish the staging directory as `out`; FileExistsError if `out` appeared and may not be replaced."""
    out, tmp = staging.out, staging.path
    fault("commit.start")
    _sync_tree(tmp)
    fault("commit.synced")
    with _signals_held():
        if not os.path.lexists(out):
            if not _rename2(tmp, out, RENAME_NOREPLACE):
                os.rename(tmp, out)
            fault("commit.swapped")
        else:
            if not force:
                raise FileExistsError(f"{out} appeared during the export; pass --force to replace it")
            if not replaceable(out):
                raise FileExistsError(f"{out} is no longer an engine or an empty directory; nothing replaced")
            if _rename2(tmp, out, RENAME_EXCHANGE):
                fault("commit.swapped")  # out: new engine; tmp's name: the old one
            else:
                old = _sibling(out, "old")
                os.rename(out, old)
                staging.leftovers.append(old)
                fault("commit.old-aside")
                os.rename(tmp, out)
                fault("commit.swapped")
        _fsync(out.parent)
        fault("commit.durable")
    staging.discard()
    fault("commit.done")
