"""The checkpoint fingerprint that every manifest records (torch-free)."""

from __future__ import annotations

import hashlib
from pathlib import Path

CHECKPOINT_FILES = ("model.safetensors", "config.json")


def checkpoint_sha256(directory: str | Path) -> str:
    """sha256 over the checkpoint's weights then its config, streamed in 1 MiB chunks."""
    h = hashlib.sha256()
    for name in CHECKPOINT_FILES:
        with open(Path(directory) / name, "rb") as f:
            while chunk := f.read(1 << 20):
                h.update(chunk)
    return h.hexdigest()
