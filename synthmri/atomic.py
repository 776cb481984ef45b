"""The one atomic file write, shared by checkpoints, job outputs and training figures (torch-free)."""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable
from pathlib import Path


def atomic_write(path: str | Path, content: bytes | Callable[[Path], object]) -> Path:
    """Write `content` (bytes, or a function that writes a given temp path) to a temp file
    next to `path`, fsync it, and rename it into place.

    A reader (or a redelivered task) sees either the old file or the whole new one, never
    half a file, and a crash leaves at most a hidden temp file behind.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        if isinstance(content, bytes):
            tmp.write_bytes(content)
        else:
            content(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path
