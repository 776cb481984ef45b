"""Checkpoints loaded once per worker process, keyed by checkpoint sha256 and device.

Celery's solo pool runs every task in the one process, so a module-level cache is
the documented place to keep a model between tasks. A small LRU bound keeps GPU
memory in check when jobs alternate between many models.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from pathlib import Path
from typing import TYPE_CHECKING

from synthmri.registry import read_model

if TYPE_CHECKING:
    from model.checkpoint import LoadedCheckpoint
    from model.generate import BatchLimit

MAX_MODELS = 2

_cache: OrderedDict[tuple[str, str], LoadedCheckpoint] = OrderedDict()
_limits: dict[tuple[str, str], BatchLimit] = {}
_lock = threading.Lock()


def get_checkpoint(directory: Path, device: str) -> LoadedCheckpoint:
    """The checkpoint in `directory` on `device`, loading it only when its sha256 is new."""
    from model.checkpoint import load_checkpoint

    sha = read_model(directory).sha256
    key = (sha, device)
    with _lock:
        if key in _cache:
            _cache.move_to_end(key)
            return _cache[key]
    ckpt = load_checkpoint(directory, device=device)
    with _lock:
        _cache[(ckpt.sha256, device)] = ckpt
        while len(_cache) > MAX_MODELS:
            _cache.popitem(last=False)
    return ckpt


def batch_limit(sha256: str, device: str) -> BatchLimit:
    """The sampling batch cap this process learned for a model on a device (out-of-memory
    splits lower it; it lasts as long as the process, since the memory it measures does)."""
    from model.generate import BatchLimit

    with _lock:
        return _limits.setdefault((sha256, device), BatchLimit())


def loaded_models() -> list[str]:
    """sha256 of every checkpoint this process holds (reported in the worker heartbeat)."""
    with _lock:
        return [sha for sha, _ in _cache]


def clear() -> None:
    with _lock:
        _cache.clear()
        _limits.clear()
