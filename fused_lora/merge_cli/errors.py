"""The one exception the merge command turns into exit code 2 and one line on stderr."""
from __future__ import annotations

import contextlib
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
