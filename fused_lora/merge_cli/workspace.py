"""The hidden folder a merge is written into, beside --out: its names, the lock that marks it as owned by a
running merge, the final rename into place, and the removal of what merges that died left behind.

For --out DIR/NAME each run picks STEM = DIR/.NAME.tmp-PID-XXXXXXXX (PID of the merge, 8 random hex digits):
  STEM.lock  created first and flock()ed for the whole run, removed last. The kernel drops the lock when its
             process dies, however it dies (kill -9, OOM killer; a power loss drops every lock), so a lock
             file nobody holds marks leftovers, and one that is held marks a merge still running.
  STEM       the new checkpoint being written; renamed to DIR/NAME once complete and verified.
  STEM.old   with --force only: the previous DIR/NAME, moved aside for the instant of the swap, then deleted.
A later run to the same --out removes the STEM and STEM.old of every unheld STEM.lock (or, if the run died
between the two renames of the swap, renames STEM.old back to DIR/NAME), and says so. Nothing else is touched:
not other outputs' folders, not names outside this pattern, not folders of a running merge.
"""

from __future__ import annotations

import errno
import os
import re
import secrets
import shutil
from typing import Callable, Optional

from fused_lora.merge_cli.errors import OutputError, one_line, writing

try:
    import fcntl
except ImportError:  # no flock (Windows): runs are unlocked, so leftovers are never judged stale
    fcntl = None

LOCK, ASIDE = ".lock", ".old"


def _stem_pattern(name: str) -> re.Pattern:
    return re.compile(rf"\.{re.escape(name)}\.tmp-(?P<pid>\d+)-[0-9a-f]{{8}}(?P<suffix>\.lock|\.old)?")


def _legacy_pattern(name: str) -> re.Pattern:
    """Folders named by fused_lora versions before the lock (tempfile.mkdtemp): no way to tell if one is live."""
    return re.compile(rf"\.{re.escape(name)}\.(tmp|old)-[a-z0-9_]{{8}}")


def _try_lock(fd: int) -> Optional[bool]:
    """True: locked; False: someone holds it; None: this file system cannot tell."""
    if fcntl is None:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False
    except OSError:
        return None


def _is_current(fd: int, path: str) -> bool:
    """Does `path` still name the file open as `fd` (and not a newer file, or nothing)?"""
    try:
        a, b = os.fstat(fd), os.stat(path)
    except OSError:
        return False
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


class Workspace:
    """The temporary folder of one run. create() -> write into .folder -> install(), or discard() on failure."""

    def __init__(self, out: str, stem: str, lock_fd: int):
        self.out, self.stem, self.lock_fd = out, stem, lock_fd
        self.installed = False
        self.leftovers: list[str] = []  # what discard() could not remove

    @property
    def folder(self) -> str:
        return self.stem

    @property
    def lock_path(self) -> str:
        return self.stem + LOCK

    @property
    def aside(self) -> str:
        return self.stem + ASIDE

    @classmethod
    def create(cls, out: str) -> "Workspace":
        parent, name = os.path.split(out)
        for _attempt in range(100):
            stem = os.path.join(parent, f".{name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")
            with writing(stem + LOCK, "create"):
                try:
                    fd = os.open(stem + LOCK, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
                except FileExistsError:
                    continue
            # Another run's sweep may have seen the new lock file before we locked it and deleted it as
            # stale; so lock it, then check that the name still points at our file, else pick another stem.
            locked = _try_lock(fd)
            if locked is not False and _is_current(fd, stem + LOCK):
                break
            os.close(fd)
        else:
            raise OutputError(parent, "create a lock file in", OSError(errno.EAGAIN, "lost the race 100 times"))
        workspace = cls(out, stem, fd)
        try:
            with writing(stem, "create the temporary folder"):
                os.mkdir(stem, 0o777)  # the umask applies, as for any folder the user creates
        except BaseException:
            workspace.discard()
            raise
        return workspace

    def install(self) -> None:
        """Rename the finished folder to --out; an existing --out is moved aside first and deleted last, and
        put back if the rename fails."""
        moved_aside = False
        if os.path.lexists(self.out):
            with writing(self.out, "move aside the existing"):
                os.rename(self.out, self.aside)
            moved_aside = True
        try:
            with writing(self.out, f"rename {self.folder} to"):
                os.rename(self.folder, self.out)
        except BaseException:
            if moved_aside:
                self._restore_aside()
            raise
        self.installed = True
        if moved_aside:
            shutil.rmtree(self.aside, ignore_errors=True)
            if os.path.lexists(self.aside):  # keep the lock file: the next run finishes the removal
                self.leftovers.append(f"{self.aside} (the previous {self.out})")
        self._release()

    def discard(self) -> None:
        """Remove the temporary folder (idempotent) and put back a --out moved aside; STEM.old is never deleted
        here. Whatever is left is listed in .leftovers, and then the lock file stays, so the next run (sweep)
        finishes the job."""
        if self.lock_fd is None:
            return
        if os.path.lexists(self.aside) and not os.path.lexists(self.out):
            self._restore_aside()
        if os.path.lexists(self.folder):
            try:
                shutil.rmtree(self.folder)
            except OSError as exc:
                self.leftovers.append(f"{self.folder} ({exc.strerror or one_line(exc)})")
        self._release()

    def _restore_aside(self) -> None:
        try:
            os.rename(self.aside, self.out)
        except OSError as exc:  # the previous --out is still whole, under its STEM.old name
            note = f"{self.aside} (holds the previous {self.out}; {exc.strerror or one_line(exc)})"
            if note not in self.leftovers:
                self.leftovers.append(note)

    def _release(self) -> None:
        if not self.leftovers:
            try:
                os.unlink(self.lock_path)
            except OSError:
                pass
        os.close(self.lock_fd)
        self.lock_fd = None


def sweep(out: str, keep: Callable[[str], bool], log: Callable[[str], None]) -> None:
    """Remove what dead merges to `out` left beside it (see the module docstring); `keep(path)` protects a path
    (the inputs). Never raises: what cannot be removed is named in a note."""
    parent, name = os.path.split(out)
    try:
        names = sorted(os.listdir(parent))
    except OSError:
        return  # a missing or unreadable parent is reported by the output checks
    pattern, legacy = _stem_pattern(name), _legacy_pattern(name)
    stems: dict[str, str] = {}
    for entry in names:
        m = pattern.fullmatch(entry)
        if m:
            stem = os.path.join(parent, entry[: len(entry) - len(m["suffix"] or "")])
            stems[stem] = m["pid"]
        elif legacy.fullmatch(entry):
            log(
                f"note: left {os.path.join(parent, entry)} alone: named by an older fused_lora, which cannot "
                "tell whether a merge still uses it; delete it if none is running"
            )
    for stem, pid in stems.items():
        if any(keep(stem + suffix) for suffix in ("", LOCK, ASIDE)):
            continue
        _reclaim(stem, pid, out, log)


def _reclaim(stem: str, pid: str, out: str, log: Callable[[str], None]) -> None:
    lock = stem + LOCK
    try:
        fd = os.open(lock, os.O_RDONLY)
    except FileNotFoundError:
        if os.path.lexists(stem) or os.path.lexists(stem + ASIDE):
            log(f"note: left {stem} alone: its lock file is missing, so it may belong to a running merge")
        return  # else: its merge just finished
    except OSError as exc:
        log(f"note: left {stem} alone: cannot open its lock file ({exc.strerror or one_line(exc)})")
        return
    try:
        locked = _try_lock(fd)
        if locked is False:
            log(f"note: left {stem} alone: merge pid {pid} is still writing it")
            return
        if locked is None:
            log(f"note: left {stem} alone: this file system cannot tell whether its merge is still running")
            return
        if not _is_current(fd, lock):
            return  # another run reclaimed it meanwhile
        done = []
        if os.path.lexists(stem + ASIDE):
            if os.path.lexists(out):
                shutil.rmtree(stem + ASIDE)
                done.append(f"removed {stem + ASIDE} (the output {out} it held was already replaced)")
            else:
                os.rename(stem + ASIDE, out)
                done.append(f"restored {out} from {stem + ASIDE} (a merge died while replacing it)")
        if os.path.lexists(stem):
            shutil.rmtree(stem)
            done.append(f"removed stale temporary folder {stem}")
        os.unlink(lock)
        log(f"{'; '.join(done) or f'removed stale lock file {lock}'} (left by merge pid {pid}, no longer running)")
    except OSError as exc:
        log(
            f"note: could not clean up {stem} left by merge pid {pid}: {exc.strerror or one_line(exc)}"
            f"{f' ({exc.filename})' if exc.filename else ''}"
        )
    finally:
        os.close(fd)
