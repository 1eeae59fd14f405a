"""Error types shared by every stage, the wording of operating-system errors that are not the file's fault, and the
limits of the operating system that those errors and the stages' memory checks name (open files, available memory)."""

from __future__ import annotations

import errno
import os
from pathlib import Path


class InputError(ValueError):
    """Bad user input: the message names the file, row and field (or attribute) at fault.

    The CLI turns it into exit code 2; library callers can catch it as a ``ValueError``.
    """


class TrainingStopped(RuntimeError):
    """Training cannot go on and must not pretend to: a non-finite loss or weights (the message names the epoch and
    step), or a checkpoint that could not be written. The run's last good checkpoint is kept as it was.

    The CLI turns it into exit code 4.
    """


# errno values that say what is wrong with the place a file lives, not with the file: such a file is never "damaged".
_NO_SPACE = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)}
_TOO_MANY_FILES = {errno.EMFILE, errno.ENFILE}


def open_files_limit() -> int:
    """The soft limit on open file descriptors of this process (`ulimit -n`); 0 when unknown."""
    try:
        import resource

        return int(resource.getrlimit(resource.RLIMIT_NOFILE)[0])
    except (ImportError, ValueError, OSError):
        return 0


def available_memory_bytes() -> int:
    """Memory the OS could give this process now (Linux MemAvailable; elsewhere the free physical pages)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 0


def os_error_message(exc: OSError, path: str | os.PathLike, what: str = "file", need: int | None = None) -> str | None:
    """A user-facing sentence for an OSError about `path`'s surroundings, or None when it is about something else
    (the file's content). Read-only file systems, permissions, a full disk or quota, and the open-files limit
    (`ulimit -n`; `need` = descriptors the command needs, when known) are named as such: the file may be healthy."""
    code = exc.errno
    if code is None:  # h5py sometimes keeps only HDF5's text
        text = str(exc)
        for candidate, marker in ((errno.EROFS, "Read-only file system"), (errno.EACCES, "Permission denied"),
                                  (errno.ENOSPC, "No space left"), (errno.EMFILE, "Too many open files")):
            if marker in text:
                code = candidate
                break
    if code == errno.EROFS:
        return (f"cannot write {what} {path}: read-only file system (its folder is on a file system mounted "
                "read-only); choose an output on a writable file system")
    if code in (errno.EACCES, errno.EPERM):
        return f"cannot open {what} {path}: permission denied; check the owner and mode of the file and its folder"
    if code in _NO_SPACE:
        return (f"no space left on the device of {Path(path).parent} while writing {what} {path}; free space or "
                "choose another output, then run the same command again")
    if code in _TOO_MANY_FILES:
        limit = open_files_limit()
        needed = f"; this command needs about {need}" if need else ""
        suggest = max(need or 0, 2 * limit, 1024)
        return (f"cannot open {what} {path}: too many open files (the open-files limit `ulimit -n` is {limit}"
                f"{needed}); the file itself is fine: raise the limit, e.g. `ulimit -n {suggest}`, and run again")
    return None


def check_writable(path: str | os.PathLike, what: str = "output") -> None:
    """Refuse, before anything is written, an output `path` (file or folder, existing or not) that cannot be
    written: on a read-only file system (statvfs ST_RDONLY) or without write permission on it or on the nearest
    existing folder above it. InputError naming the path and the reason. Creates nothing."""
    path = Path(path)
    probe = path
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    try:
        readonly = bool(os.statvfs(probe).f_flag & os.ST_RDONLY)
    except (OSError, AttributeError):
        readonly = False
    if readonly:
        raise InputError(f"cannot write {what} {path}: read-only file system ({probe} is on a file system mounted "
                         "read-only); choose an output on a writable file system")
    # an existing file is rewritten in place or replaced beside it; anything new is made in the nearest folder
    targets = ([path, path.parent] if path.is_file() else [path]) if path.exists() else [probe]
    for target in targets:
        if not os.access(target, os.W_OK):
            raise InputError(f"cannot write {what} {path}: permission denied on {target}; check its owner and mode")
