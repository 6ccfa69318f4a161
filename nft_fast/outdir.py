"""Output folders that one run owns at a time and whose files change together.

- :class:`FolderLock`: a lock file inside the folder, held with ``flock`` (the kernel releases it
  when the process dies, even by SIGKILL); the pid and command in it say who holds it, and a
  lock left by a dead process is taken over with a message.
- :class:`OutputSet`: a command's files are written into a private staging folder inside the
  output folder, then moved into place together: the files already there (only the names the
  command writes) are removed first, the marker file (``report.json``) before the others, the
  new files moved in, the marker last. A reader never sees files of two runs next to each other
  or a half-written file; a set without its marker is incomplete.
- :func:`deferred_interrupt`: Ctrl-C (SIGINT) held back while a commit or a checkpoint is written.
- :class:`Interrupted`: a ``KeyboardInterrupt`` carrying one line on what was saved and how to
  continue (the command line prints it and exits with 130).
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable, Iterator, List, Optional, Sequence, Union

from .errors import Busy

__all__ = [
    "FolderLock", "OutputSet", "Interrupted", "Busy", "deferred_interrupt", "file_mode", "fsync_dir",
    "LOCK_NAME", "STAGING_PREFIX",
]

PathLike = Union[str, os.PathLike]
LOCK_NAME = ".nft-fast.lock"
STAGING_PREFIX = ".staging-"


class Interrupted(KeyboardInterrupt):
    """Ctrl-C, with ``note``: one line saying what was saved and how to continue."""

    def __init__(self, note: str = "") -> None:
        super().__init__(note)
        self.note = note


def file_mode() -> int:
    """``0o666`` less the process's umask: the mode ``open()`` gives a new file (``mkstemp``
    gives 0600)."""
    try:  # Linux >= 4.7: read without changing it (os.umask sets it, racing other threads)
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return 0o666 & ~int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return 0o666 & ~mask


def fsync_dir(path: PathLike) -> None:
    """Make renames inside ``path`` durable (a no-op where directories cannot be opened)."""
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def deferred_interrupt() -> Iterator[None]:
    """Hold back SIGINT inside the block (main thread only) and deliver it on exit, so a Ctrl-C
    cannot stop a commit or a checkpoint half-way."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: List[tuple] = []
    try:
        old = signal.signal(signal.SIGINT, lambda *a: caught.append(a))
    except (ValueError, OSError):  # not allowed here (an embedded interpreter)
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, old)
        if caught:
            if callable(old):
                old(*caught[0])
            elif old == signal.SIG_DFL:
                raise KeyboardInterrupt


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class FolderLock:
    """``folder/.nft-fast.lock``, held with ``flock`` for the life of a run. ``acquire`` refuses
    (:class:`Busy`) while another live process holds it; one left by a dead process is taken
    over (``log`` says so). ``release`` removes the file."""

    def __init__(self, folder: PathLike, option: str = "--out") -> None:
        self.folder, self.option = Path(folder), option
        self.path = self.folder / LOCK_NAME
        self.fd: Optional[int] = None

    def _holder(self, fd: int) -> dict:
        try:
            os.lseek(fd, 0, os.SEEK_SET)
            info = json.loads(os.read(fd, 65536).decode() or "{}")
            return info if isinstance(info, dict) else {}
        except (OSError, ValueError):
            return {}

    def _busy(self, info: dict) -> Busy:
        who = f"pid {info['pid']}" if "pid" in info else "another process"
        since = f", since {info['started']}" if "started" in info else ""
        return Busy(f"{self.option} {self.folder} is in use by another nft-fast run ({who}{since}); wait for it "
                    f"to finish or choose another {self.option}")

    def check(self) -> None:
        """Raise :class:`Busy` if a live process holds the lock; creates and changes nothing."""
        import fcntl

        try:
            fd = os.open(self.path, os.O_RDONLY)
        except OSError:
            return
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise self._busy(self._holder(fd)) from None
        finally:
            os.close(fd)  # also drops a lock just taken

    def acquire(self, log: Optional[Callable[[str], None]] = None) -> None:
        import fcntl

        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, file_mode())
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                info = self._holder(fd)
                os.close(fd)
                raise self._busy(info) from None
            try:  # the holder may have removed the file between our open and flock
                st, now = os.fstat(fd), os.stat(self.path)
                if (st.st_ino, st.st_dev) == (now.st_ino, now.st_dev):
                    break
            except FileNotFoundError:
                pass
            os.close(fd)
        prev = self._holder(fd)
        if prev.get("pid") not in (None, os.getpid()) and log is not None:
            gone = "is no longer running" if not _alive(int(prev["pid"])) else "no longer holds it"
            log(f"nft-fast: taking over the lock of {self.folder} from process {prev['pid']}, which {gone}")
        info = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S"),
                "command": " ".join(sys.argv)[:500]}
        os.ftruncate(fd, 0)
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, (json.dumps(info) + "\n").encode())
        self.fd = fd

    def release(self) -> None:
        if self.fd is None:
            return
        try:
            st, now = os.fstat(self.fd), os.stat(self.path)
            if (st.st_ino, st.st_dev) == (now.st_ino, now.st_dev):
                os.unlink(self.path)  # while still holding it: a waiting opener re-checks the inode
        except OSError:
            pass
        os.close(self.fd)
        self.fd = None


class OutputSet:
    """The files ``names`` of one command in ``folder``, replaced together (see the module doc).
    ``marker`` (one of ``names``) is removed first and moved in last: present, it marks a
    complete set."""

    def __init__(self, folder: PathLike, names: Sequence[str], marker: Optional[str] = None) -> None:
        self.folder, self.names, self.marker = Path(folder), tuple(names), marker
        self.staging: Optional[Path] = None

    def existing(self) -> List[str]:
        """The names of the set present in the folder (outputs already there)."""
        return [n for n in self.names if (self.folder / n).is_file() or (self.folder / n).is_symlink()]

    def remove_stale_staging(self) -> None:
        """Staging folders a killed run left behind (call while holding the folder's lock)."""
        for p in self.folder.glob(STAGING_PREFIX + "*"):
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p, ignore_errors=True)

    def stage(self) -> Path:
        """A new private folder inside ``folder`` to write the set into."""
        self.staging = Path(tempfile.mkdtemp(prefix=f"{STAGING_PREFIX}{os.getpid()}-", dir=self.folder))
        return self.staging

    def _order(self, names: Sequence[str]) -> List[str]:
        return [n for n in names if n != self.marker] + [n for n in names if n == self.marker]

    def commit(self) -> List[str]:
        """Replace the folder's set by the staged one; returns the names moved in."""
        if self.staging is None:
            raise RuntimeError("OutputSet.commit before stage")
        staged = sorted(p.name for p in self.staging.iterdir())
        unknown = [n for n in staged if n not in self.names]
        if unknown:
            raise RuntimeError(f"staged files outside the output set: {unknown}")
        mode = file_mode()
        for n in staged:
            os.chmod(self.staging / n, mode)
        with deferred_interrupt():
            for n in reversed(self._order(self.existing())):  # the marker first
                (self.folder / n).unlink()
            new = self._order([n for n in self.names if n in staged])
            for n in new:
                os.replace(self.staging / n, self.folder / n)
            fsync_dir(self.folder)
            self.staging.rmdir()
            self.staging = None
        return new

    def discard(self) -> None:
        if self.staging is not None:
            shutil.rmtree(self.staging, ignore_errors=True)
            self.staging = None
