"""Files a run reads and writes: atomic writes (a result or checkpoint is either the old file or
the new one, never half), checkpoints loaded as data only, json, and the metrics log."""
from __future__ import annotations

import json
import os
import re
import stat
import tempfile
import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import Any

# tempfile.mkstemp's names in atomic_write_bytes: ".{name}." + 8 characters of
# tempfile._RandomNameSequence (a-z, 0-9, _) + ".tmp".
_TEMPORARY_NAME = re.compile(r"^\..+\.[a-z0-9_]{8}\.tmp$")


def _umask() -> int:
    """The process umask, read without changing it where Linux allows (os.umask can only set it)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _mode_for(path: Path) -> int:
    """The mode open(path, "w") would leave: the existing file's, else 0666 minus the umask."""
    try:
        return stat.S_IMODE(os.stat(path).st_mode)
    except FileNotFoundError:
        return 0o666 & ~_umask()


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to a temporary file beside ``path``, fsync it, then rename over ``path``.

    The file gets the mode a plain write would give it (mkstemp's files are 0600).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, _mode_for(path))
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        # Leave no stray temporary file behind, whatever interrupted us.
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_json(path: str | os.PathLike, obj: Any, indent: int | None = 2) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=indent) + "\n").encode())


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    import io

    import torch

    buffer = io.BytesIO()
    torch.save(obj, buffer)
    atomic_write_bytes(path, buffer.getvalue())


def read_json(path: str | os.PathLike) -> Any:
    """Read json, naming the file in the error when it is not valid json."""
    path = Path(path)
    try:
        with open(path) as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: invalid JSON at line {e.lineno} column {e.colno}: {e.msg}") from None


def replace_dir(path: str | os.PathLike, force: bool, is_ours, what: str, hint: str = "") -> Path:
    """Make ``path`` an empty directory to write ``what`` into, never losing anything by accident.

    A missing or empty directory is used as it is. One that holds something is replaced only
    with ``force``, and only when ``is_ours(path)`` says sodlab made it: a foreign folder is never
    deleted. The one overwrite guard of runs and benches (``hint`` says how else to proceed).
    """
    path = Path(path)
    check_replaceable(path, force, is_ours, what, hint)
    if path.is_dir() and any(path.iterdir()):
        import shutil

        shutil.rmtree(path)
    path.mkdir(parents=True, exist_ok=True)
    return path


def check_replaceable(path: str | os.PathLike, force: bool, is_ours, what: str, hint: str = "") -> None:
    """The refusals of ``replace_dir``, touching nothing: callers check before any other work."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise FileExistsError(f"{path}: exists and is not a directory")
    if path.is_dir() and any(path.iterdir()):
        if not force:
            raise FileExistsError(f"{path} already holds a {what}; {hint or 'choose another folder'}, "
                                  "or pass --force to replace it")
        if not is_ours(path):
            raise FileExistsError(f"{path}: not a sodlab {what} (no marker file), so --force will not delete it; "
                                  "choose another folder")


def remove_stale_temporaries(directory: str | os.PathLike) -> list[Path]:
    """Delete the temporary files of atomic writes that were killed mid-way (``.NAME.XXXXXXXX.tmp``)
    in ``directory`` and its subfolders; return them.

    A live atomic write owns such a file for the moment it writes, so call this only while no
    other process writes into ``directory`` (in a run directory: while holding its ``RunLock``).
    """
    removed = []
    for root, _, files in os.walk(directory):
        for name in files:
            path = Path(root) / name
            if _TEMPORARY_NAME.match(name) and path.is_file() and not path.is_symlink():
                path.unlink(missing_ok=True)
                removed.append(path)
    return removed


class CheckpointError(ValueError):
    """A checkpoint file that sodlab will not load; the message is one line naming the file."""


def _first_sentence(error: BaseException) -> str:
    text = " ".join(str(error).split())
    return (text.split(". ")[0].rstrip(".") if text else "") or type(error).__name__


def load_checkpoint_file(path: str | os.PathLike, map_location: Any = "cpu",
                         keys: Iterable[str] = ("model",)) -> dict:
    """A checkpoint as data: ``torch.load(weights_only=True)``, so unpickling can build tensors and
    plain values but call nothing (a pickle whose ``__reduce__`` names ``os.system`` is refused
    before anything runs). Every failure is a one-line ``CheckpointError`` naming the file: a
    global the loader does not allow, a truncated or foreign file, a payload that is not a dict,
    or a missing one of ``keys``. A missing file is ``FileNotFoundError``.
    """
    import pickle

    import torch

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: checkpoint not found")
    try:
        checkpoint = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        # torch's message spans paragraphs and suggests weights_only=False; name the global instead.
        found = re.search(r"GLOBAL\s+([\w.]+)", str(e))
        needs = f"the Python object {found.group(1)}" if found else "more than tensors and plain values"
        raise CheckpointError(
            f"{path}: refused to load: it needs {needs}, and loading it could run code; a sodlab "
            "checkpoint holds tensors and plain values only") from None
    except (RuntimeError, EOFError, KeyError, ValueError, OSError, MemoryError) as e:
        # The zip reader (RuntimeError), an empty file (EOFError) or a file that is not a torch
        # save at all (KeyError on its magic number).
        raise CheckpointError(f"{path}: not a readable checkpoint (truncated or not written by torch.save): "
                              f"{_first_sentence(e)}") from None
    if not isinstance(checkpoint, dict):
        raise CheckpointError(f"{path}: expected a checkpoint dict, got {type(checkpoint).__name__}")
    missing = [key for key in keys if key not in checkpoint]
    if missing:
        raise CheckpointError(f"{path}: not a sodlab checkpoint: missing {', '.join(map(repr, missing))}")
    return checkpoint


def read_metrics_log(path: str | os.PathLike) -> list[dict]:
    """A metrics.jsonl as a list of records.

    A torn last line (the process was killed while appending it) is dropped with a warning naming
    the file; a bad line anywhere else, or a record that is not a json object, is a ValueError
    naming the file and the line.
    """
    path = Path(path)
    lines = [(number, line) for number, line in enumerate(path.read_text().splitlines(), start=1) if line.strip()]
    records = []
    for position, (number, line) in enumerate(lines):
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            if position == len(lines) - 1:
                warnings.warn(f"{path}: dropped the torn last line {number} (not valid json: {e.msg}); "
                              "the run was probably killed while writing it", stacklevel=2)
                break
            raise ValueError(f"{path}: line {number} is not valid json ({e.msg})") from None
        if not isinstance(record, dict):
            raise ValueError(f"{path}: line {number}: expected a json object, got {type(record).__name__}")
        records.append(record)
    return records
