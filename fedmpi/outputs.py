"""A run's output paths, claimed and checked by rank 0 before any slow work.

* :func:`claim`: an exclusive ``flock`` on ``<run file>.lock``, taken before the run file
  is looked at and held by rank 0 for the whole run (the kernel drops it when the process
  ends, however it ends). Two jobs started with the same ``run.name`` cannot both pass
  the "file exists" check and write one file: the second is refused (exit 2) before it
  loads any data, naming the job that holds the lock. The lock file is removed at the
  end of a run; one left by a crashed run holds no lock and is simply reused.
* :func:`probe_dir`: a real write probe of a folder (permission bits say nothing to root
  or on a read-only mount), for ``run.out_dir`` and the checkpoint's folder.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import os
import socket
import sys
import tempfile

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX
    fcntl = None


class Claim:
    """The lock on one run file (``fd`` None where the file system has no locks)."""

    def __init__(self, path: str, lock: str, fd: int | None):
        self.path, self.lock, self.fd = path, lock, fd

    def release(self) -> None:
        """Remove the lock file, then drop the lock (in this order: a job that opened the
        old file meanwhile sees it unlinked and takes a fresh one, see :func:`claim`)."""
        if self.fd is None:
            return
        with contextlib.suppress(OSError):
            os.unlink(self.lock)
        os.close(self.fd)
        self.fd = None


_held: list[Claim] = []


def _holder(fd: int) -> str:
    try:
        text = os.pread(fd, 200, 0).decode(errors="replace").strip()
    except OSError:
        text = ""
    return text or "another process"


def claim(path: str) -> Claim:
    """Lock ``path`` (a run file) for this process, or raise FileExistsError naming the
    job that holds it. The lock lives until :func:`release_all` or the process's end."""
    lock = f"{path}.lock"
    if fcntl is None:  # pragma: no cover
        return Claim(path, lock, None)
    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            holder = _holder(fd)
            os.close(fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise FileExistsError(
                    f"run.name: {path} is in use by another fedmpi job ({holder}; lock "
                    f"{lock}); wait for it to end or choose another run.name") from None
            print(f"fedmpi: warning: cannot lock {lock} ({exc.strerror}): nothing stops a "
                  "second job with this run.name from writing the same file",
                  file=sys.stderr, flush=True)
            return Claim(path, lock, None)
        try:  # the previous holder may have unlinked the file between our open and flock
            current = os.stat(lock)
        except FileNotFoundError:
            current = None
        if current is not None and os.path.samestat(os.fstat(fd), current):
            break
        os.close(fd)
    since = datetime.datetime.now().isoformat(timespec="seconds")
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()} since {since}\n".encode(), 0)
    held = Claim(path, lock, fd)
    _held.append(held)
    return held


def release_all() -> None:
    """Release every claim of this process (end of a run; a crash releases them too)."""
    while _held:
        _held.pop().release()


def probe_dir(folder: str, key: str) -> str:
    """Create ``folder`` if needed and write a file in it; PermissionError naming ``key``
    and the folder where that fails. Returns the absolute folder."""
    folder = os.path.abspath(folder)
    try:
        os.makedirs(folder, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".fedmpi-probe-"):
            pass
    except OSError as exc:
        raise PermissionError(f"{key}: {folder} is not writable ({exc.strerror})") from None
    return folder
