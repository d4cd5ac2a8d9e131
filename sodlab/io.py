"""Atomic file writes: a result or checkpoint is either the old file or the new one, never half."""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to a temporary file beside ``path``, fsync it, then rename over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
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
