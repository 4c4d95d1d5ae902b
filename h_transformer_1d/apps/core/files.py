"""File I/O that follows no planted link and waits on no device: exclusive creation, durable writes, bounded reads.

Every temporary name is random and created exclusively (O_EXCL, `tempfile.mkstemp` / `mkdtemp`), so a
symbolic link planted under a predictable name is never followed and its target never overwritten. A
file read as input is opened without blocking and must be a regular file, so a FIFO, /dev/zero or a
socket is refused instead of hanging or filling memory.
"""

import os
import stat
import tempfile
from pathlib import Path
from typing import BinaryIO

CHUNK = 1 << 20  # bytes per read: memory stays bounded while a large file is hashed or streamed


class NotRegularError(OSError):
    """A path that should name a regular file names a FIFO, a device, a socket or a directory."""


def kind_of(mode: int) -> str:
    for test, name in ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"), (stat.S_ISBLK,
                       "a block device"), (stat.S_ISSOCK, "a socket"), (stat.S_ISDIR, "a directory")):  # fmt: skip
        if test(mode):
            return name
    return "not a regular file"


def open_regular(path: Path) -> BinaryIO:
    """`path` opened for reading in binary mode; NotRegularError unless it is a regular file. The open does not
    block (a FIFO without a writer would wait forever), and the check is made on the opened file, so a path
    swapped between a check and the open changes nothing."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise NotRegularError(f"{path} is {kind_of(mode)}, not a regular file")
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def read_bounded(path: Path, limit: int) -> bytes:
    """The whole regular file `path`, refused (ValueError) when it holds more than `limit` bytes."""
    with open_regular(path) as f:
        data = f.read(limit + 1)
    if len(data) > limit:
        raise ValueError(f"{path} holds more than {limit:,} bytes")
    return data


def write_new(path: Path, data: bytes) -> None:
    """Create `path` (it must not exist; a link there is not followed), write `data` and flush it to disk."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o644)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def fsync_dir(path: Path) -> None:
    """Make the entries of directory `path` (a rename into it) durable; a no-op where directories cannot be
    opened (Windows)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, data: bytes) -> None:
    """Replace `path` by a file holding `data`: a reader sees the old content or the new, never a mix. Written
    to an exclusively created temporary file beside it, flushed to disk, then renamed over it."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; a log or result is as readable as any other file
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
