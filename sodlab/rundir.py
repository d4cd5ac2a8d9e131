"""What sodlab may do to a run directory: replace only its own runs, and write each run from one process.

A directory is a sodlab run when its config.json carries ``RUN_MARKER``; sodlab writes that key
into every run's config.json and replaces (``--force``) nothing without it, nor any folder that
holds or sits inside the data being trained on. While a run is trained, its process holds
``RunLock``: an ``fcntl.flock`` on ``RUN_DIR/.sodlab.lock``, which the OS releases when the
holder dies, so a crashed run never leaves a stale lock behind. A second process (a second
``sodlab train``, with or without ``--force``) is refused with the holder's PID.
"""
from __future__ import annotations

import errno
import fcntl
import os
import shutil
import socket
import stat
from collections.abc import Iterable
from pathlib import Path

from sodlab.io import read_json

RUN_MARKER = "sodlab_run"  # config.json key; its value is the run directory's format version
RUN_FORMAT = 1
LOCK_NAME = ".sodlab.lock"

# Run directories this process holds the lock of (resolved path -> RunLock).
_held: dict[Path, RunLock] = {}


class RunInUseError(OSError):
    """Another live process holds the run directory's lock."""


def is_sodlab_run(run_dir: str | os.PathLike) -> bool:
    """True when RUN_DIR/config.json is a json object carrying ``RUN_MARKER`` (a format version >= 1)."""
    config_path = Path(run_dir) / "config.json"
    if not config_path.is_file():
        return False
    try:
        config = read_json(config_path)
    except (OSError, ValueError):
        return False
    marker = config.get(RUN_MARKER) if isinstance(config, dict) else None
    return isinstance(marker, int) and not isinstance(marker, bool) and marker >= 1


def run_contents(run_dir: str | os.PathLike) -> list[Path]:
    """The entries of ``run_dir`` other than its lock file ([] when it does not exist)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    return sorted(p for p in run_dir.iterdir() if p.name != LOCK_NAME)


def _overlap(run_dir: Path, other: Path) -> str | None:
    """How ``run_dir`` and ``other`` (both resolved) overlap, if they do."""
    if run_dir == other:
        return "is"
    if run_dir in other.parents:
        return "holds"
    if other in run_dir.parents:
        return "is inside"
    return None


def check_replaceable(run_dir: str | os.PathLike, data_dir: str | os.PathLike,
                      protected: Iterable[str | os.PathLike | None] = ()) -> None:
    """Raise a one-line ValueError unless ``run_dir`` may be deleted to make room for a new run.

    Refused: a folder that is, holds or is inside ``data_dir`` or any of ``protected`` (e.g. the
    run a staged schedule initialises from; None and "" are skipped), and any non-empty folder
    that is not a sodlab run.
    A missing or empty folder passes (there is nothing to delete).
    """
    run_dir = Path(run_dir)
    resolved = run_dir.resolve()
    for role, other in [("the data being trained on", data_dir)] + [("a run this one reads", p) for p in protected]:
        if other is None or os.fspath(other) == "":  # unset (TrainConfig's init_from is ""), not the cwd
            continue
        relation = _overlap(resolved, Path(other).resolve())
        if relation:
            raise ValueError(f"{run_dir}: refusing to replace it: it {relation} {other} "
                             f"({role}); choose another --out")
    if run_contents(run_dir) and not is_sodlab_run(run_dir):
        raise ValueError(f"{run_dir}: refusing to replace it: not a sodlab run (its config.json lacks "
                         f"{RUN_MARKER!r}); sodlab deletes only its own runs, so move it or choose another --out")


def replace_run_dir(run_dir: str | os.PathLike, data_dir: str | os.PathLike,
                    protected: Iterable[str | os.PathLike | None] = ()) -> None:
    """Empty ``run_dir`` for a new run, after ``check_replaceable``; the lock file stays.

    The caller must hold ``RunLock(run_dir)``: a live run cannot be replaced, because its process
    holds the lock.
    """
    run_dir = Path(run_dir)
    if run_dir.resolve() not in _held:
        raise RuntimeError(f"{run_dir}: replace_run_dir needs the run's lock (with RunLock(run_dir): ...)")
    check_replaceable(run_dir, data_dir, protected)
    for entry in run_contents(run_dir):
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()


def _make_dir(path: Path) -> None:
    """``mkdir -p`` while another process may remove the (empty) directory at any moment.

    Path.mkdir(exist_ok=True) raises FileExistsError when the directory exists at its mkdir and
    is gone by its is_dir check: a releasing lock holder removed it in between. Make it again then.
    """
    while True:
        try:
            path.mkdir(parents=True, exist_ok=True)
            return
        except FileExistsError:
            if os.path.lexists(path) and not path.is_dir():
                raise NotADirectoryError(f"{path}: not a directory") from None


class RunLock:
    """Exclusive lock on a run directory for the run's lifetime (a context manager).

    Creates the directory when missing (and removes it again on release if the run left it
    empty, so a failed start leaves nothing behind). A second holder, in this process or
    another, gets ``RunInUseError`` naming the holder's PID. Under torchrun only rank 0 should
    take it.
    """

    def __init__(self, run_dir: str | os.PathLike) -> None:
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_NAME
        self._fd: int | None = None
        self._created_dir = False

    def acquire(self) -> RunLock:
        try:  # one stat: a releasing holder may remove the (empty) directory at any moment
            mode = os.stat(self.run_dir).st_mode
        except FileNotFoundError:
            mode = None
        if mode is not None and not stat.S_ISDIR(mode):
            raise NotADirectoryError(f"{self.run_dir}: not a directory")
        self._created_dir = mode is None
        _make_dir(self.run_dir)
        while True:
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            except FileNotFoundError:
                # A holder that created the run directory released it and removed it (empty)
                # between our mkdir and open: make it again, and remove it on release in turn.
                _make_dir(self.run_dir)
                self._created_dir = True
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                holder = os.pread(fd, 200, 0).decode(errors="replace").strip()
                os.close(fd)
                if e.errno not in (errno.EAGAIN, errno.EACCES):
                    raise
                raise RunInUseError(
                    f"{self.run_dir}: in use by sodlab process {holder or '(PID not yet written)'}; "
                    "wait for it to end or stop it (--force does not replace a live run)") from None
            # A holder that released between our open and flock unlinked the file we locked.
            try:
                current = os.stat(self.path)
            except FileNotFoundError:
                current = None
            locked = os.fstat(fd)
            if current is not None and (current.st_dev, current.st_ino) == (locked.st_dev, locked.st_ino):
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()} on {socket.gethostname()}\n".encode(), 0)
        self._fd = fd
        _held[self.run_dir.resolve()] = self
        return self

    def release(self) -> None:
        if self._fd is None:
            return
        _held.pop(self.run_dir.resolve(), None)
        # Unlink while still holding the lock; an acquirer that opened the old file sees it is gone.
        self.path.unlink(missing_ok=True)
        os.close(self._fd)
        self._fd = None
        if self._created_dir:
            try:
                self.run_dir.rmdir()  # only succeeds when the run wrote nothing
            except OSError:
                pass

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
