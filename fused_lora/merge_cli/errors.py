"""The two failures the merge command reports in one line on stderr: MergeError (bad input, exit code 2) and
OutputError (the output could not be written: disk full, read-only, permissions; exit code 3)."""

from __future__ import annotations

import contextlib
import errno
import os
from typing import Iterator, Optional


class MergeError(Exception):
    """Bad input (or a failed verification): names the file and the key it is about."""

    def __init__(self, path: Optional[str], key: Optional[str], message: str):
        self.path, self.key, self.message = path, key, message
        where = ": ".join(str(p) for p in (path, key) if p)
        super().__init__(f"{where}: {message}" if where else message)


def one_line(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return " ".join(text.split())


@contextlib.contextmanager
def blame(path: Optional[str], key: Optional[str] = None, what: str = "") -> Iterator[None]:
    """Any failure inside (a corrupt file can raise almost anything) becomes a MergeError naming path and key."""
    try:
        yield
    except MergeError:
        raise
    except (Exception, RecursionError) as exc:  # noqa: BLE001 - corrupt inputs raise arbitrary types
        prefix = f"{what}: " if what else ""
        raise MergeError(path, key, f"{prefix}{type(exc).__name__}: {one_line(exc)}") from exc


class OutputError(Exception):
    """Writing the output failed for a reason of the environment, not of the inputs. Python's write() and
    fsync() errors carry no file name, so the path is attached here, where it is known."""

    def __init__(self, path: str, action: str, cause: OSError):
        self.path, self.action, self.cause = path, action, cause
        name = errno.errorcode.get(cause.errno, "") if cause.errno is not None else ""
        reason = cause.strerror or (os.strerror(cause.errno) if cause.errno else one_line(cause))
        super().__init__(f"cannot {action} {path}: {reason}" + (f" ({name})" if name else ""))


@contextlib.contextmanager
def writing(path: str, action: str = "write") -> Iterator[None]:
    """An OSError inside (open, write, fsync, close, rename, mkdir) becomes an OutputError naming `path`.
    Input reads inside must turn their own OSErrors into MergeError first, or they would be blamed on `path`."""
    try:
        yield
    except OSError as exc:
        raise OutputError(path, action, exc) from exc
