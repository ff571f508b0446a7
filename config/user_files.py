"""Files an operator names (the config, a domain XML, a passwords file): read only when regular.

A path may name anything. A FIFO blocks a read forever, a directory or a device holds no
file's text, an empty path is no file at all, and each of Python's errors (IsADirectoryError,
UnicodeDecodeError, ...) would otherwise reach the operator as a traceback. Every way a read
can fail is one UserFileError whose message is a short reason ("no such file", "is a FIFO,
not a regular file"), for the caller to put after the option or setting that named the file.

Kept at the bottom layer (config/) because the settings themselves are such a file.
"""

from __future__ import annotations

import os
import stat

# What a path that is not a regular file turned out to be, by stat's file type.
_KINDS = {
    stat.S_IFIFO: "a FIFO",
    stat.S_IFSOCK: "a socket",
    stat.S_IFCHR: "a character device",
    stat.S_IFBLK: "a block device",
}


class UserFileError(ValueError):
    """Why a file cannot be used, as a short phrase without the file's name."""


def _not_regular(mode: int) -> UserFileError:
    if stat.S_ISDIR(mode):
        return UserFileError("is a directory")
    kind = _KINDS.get(stat.S_IFMT(mode))
    return UserFileError(f"is {kind}, not a regular file" if kind else "is not a regular file")


def _os_problem(exc: OSError) -> UserFileError:
    if isinstance(exc, FileNotFoundError):
        return UserFileError("no such file")
    if isinstance(exc, IsADirectoryError):
        return UserFileError("is a directory")
    return UserFileError(f"cannot read it ({exc.strerror or exc})")


def regular_file(path: str | os.PathLike[str]) -> os.stat_result:
    """The file's status (symlinks followed), or UserFileError for an empty path, a file that
    is not there, or anything but a regular file; the file itself is not opened."""
    if not os.fspath(path):
        raise UserFileError("the path is empty")
    try:
        info = os.stat(path)
    except OSError as exc:
        raise _os_problem(exc) from None
    if not stat.S_ISREG(info.st_mode):
        raise _not_regular(info.st_mode)
    return info


def read_bytes(path: str | os.PathLike[str], limit: int | None = None) -> bytes:
    """The content of a regular file, at most `limit` + 1 bytes (for the caller to tell a
    file over `limit` apart), or UserFileError.

    The file's type is checked before it is opened, then again on what was opened: it is
    opened without blocking, so a FIFO put in its place in between is refused, not waited on.
    """
    regular_file(path)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        raise _os_problem(exc) from None
    with os.fdopen(fd, "rb") as f:
        try:
            mode = os.fstat(fd).st_mode
            if not stat.S_ISREG(mode):
                raise _not_regular(mode)
            return f.read() if limit is None else f.read(limit + 1)
        except OSError as exc:
            raise _os_problem(exc) from None


def read_text(path: str | os.PathLike[str]) -> str:
    """The whole of a regular file decoded as UTF-8, or UserFileError ("not UTF-8 text")."""
    raw = read_bytes(path)
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise UserFileError("not UTF-8 text") from None
