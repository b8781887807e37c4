"""Atomic publication of files and directories: a reader, or a crash, sees the old version or
the new one, never half of one.

Files: written to a temporary file in the target's directory (same file system, so the
final `os.replace` is a rename), flushed and fsynced, then renamed over the target; the
temporary file is removed if anything fails. Directories: built under a staging name, then
renamed into place in one step.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any


def plain_open_mode() -> int:
    """The mode a plain `open` gives a new file (0666 minus the umask); mkstemp uses 0600."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def atomic_write(path: str | os.PathLike, write: Callable[[IO], Any], *, binary: bool = False,
                 prefix: str | None = None, suffix: str = ".tmp", mode: int | None = None) -> None:
    """Publish `path` with the content `write(stream)` puts in an open stream.

    Args:
        binary: open the stream in bytes mode (else UTF-8 text).
        prefix, suffix: temporary file name parts (default ``.<name>.<random>.tmp``, so
            directory scans that skip dot-files or ``.tmp`` leftovers skip it).
        mode: file mode of the result (default: what a plain `open` would give).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}." if prefix is None else prefix,
                                         suffix=suffix, dir=path.parent)
    try:
        os.fchmod(handle, plain_open_mode() if mode is None else mode)
        with os.fdopen(handle, "wb" if binary else "w", encoding=None if binary else "utf-8") as stream:
            write(stream)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temporary, path)
    except BaseException as error:
        Path(temporary).unlink(missing_ok=True)
        full = disk_full_error(error, path)
        if full is not None:
            raise full from error
        raise


# -- a full disk, said in one line -----------------------------------------------------------
# torch.save reports a failed write as "inline_container.cc ... unexpected pos" with the
# OSError only in the exception's context; these find it and name the path and errno.
_NO_SPACE = {errno.ENOSPC, errno.EDQUOT}


def disk_full_error(error: BaseException, path: str | os.PathLike) -> OSError | None:
    """A one-line OSError naming `path` and the errno when `error` (or anything in its
    cause/context chain) is ENOSPC or EDQUOT; None otherwise."""
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, OSError) and current.errno in _NO_SPACE:
            code = current.errno
            return OSError(code, f"no space left writing {os.fspath(path)} (errno {code} {errno.errorcode[code]}: "
                                 f"{os.strerror(code)}); free space or quota on that file system, or write elsewhere")
        current = current.__cause__ or current.__context__
    return None


@contextlib.contextmanager
def reraise_disk_full(path: str | os.PathLike) -> Iterator[None]:
    """Re-raise a full disk or quota (anywhere in the exception chain) as `disk_full_error`."""
    try:
        yield
    except BaseException as error:
        full = disk_full_error(error, path)
        if full is None:
            raise
        raise full from error


def atomic_write_json(path: str | os.PathLike, obj: Any, *, prefix: str | None = None, suffix: str = ".tmp",
                      **dump_options: Any) -> None:
    """`atomic_write` of ``json.dump(obj, **dump_options)`` plus a final newline.

    Strict JSON by default (``allow_nan=False``): a NaN/inf raises ValueError instead of
    writing the bare ``NaN`` that strict parsers reject; writers put null there and say why.
    """
    dump_options.setdefault("allow_nan", False)

    def write(stream: IO) -> None:
        json.dump(obj, stream, **dump_options)
        stream.write("\n")

    atomic_write(path, write, prefix=prefix, suffix=suffix)


def publish_dir(staging: Path, target: Path) -> None:
    """Rename the complete `staging` directory to `target`. If another process published the
    same (content-addressed) target first, keep theirs and drop ours."""
    try:
        os.rename(staging, target)
    except OSError:
        if not target.exists():
            raise
        shutil.rmtree(staging, ignore_errors=True)


def discard_dir(path: Path, prefix: str) -> None:
    """Move a directory out of the way in one rename (into `<prefix>trash-*`), then delete it."""
    trash = Path(tempfile.mkdtemp(prefix=f"{prefix}trash-", dir=path.parent))
    os.rename(path, trash / path.name)
    shutil.rmtree(trash, ignore_errors=True)
