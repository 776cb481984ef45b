"""The model registry: every checkpoint directory under the models dir, read from config.json.

Torch-free (the API uses it): config.json is read as plain JSON, and the sha256 of a
checkpoint is cached by file size and mtime so listing models does not rehash weights.
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from synthmri.channels import CHANNEL_SETS, resolve_for_channels
from synthmri.contract import DEFAULT_STEPS, SAMPLERS, Sampler, resolve_sampling
from synthmri.hashing import CHECKPOINT_FILES, checkpoint_sha256
from synthmri.modelcard import read_card, recommendation


class RegistryError(ValueError):
    """A request that names no usable model; the message says what is available."""


@dataclass(frozen=True)
class ModelInfo:
    name: str
    channel_set: str
    channels: tuple[str, ...]
    image_size: int
    diffusion_steps: int
    provenance: dict[str, Any]
    sha256: str
    path: Path
    samplers: tuple[str, ...] = SAMPLERS
    default_steps: dict[str, int] = field(default_factory=lambda: dict(DEFAULT_STEPS))
    card: dict[str, Any] | None = None  # eval.json, when it was written for these weights

    @property
    def recommended(self) -> tuple[str, int] | None:
        return recommendation(self.card)

    def sampling(self, sampler: str | None, steps: int | None) -> tuple[Sampler, int]:
        """The (sampler, steps) a request for this model runs with (see `resolve_sampling`)."""
        return resolve_sampling(sampler, steps, self.recommended)

    def public(self) -> dict[str, Any]:
        rec = self.recommended
        return {
            "recommended": {"sampler": rec[0], "steps": rec[1]} if rec else None,
            "card": self.card,
            "name": self.name,
            "channel_set": self.channel_set,
            "channels": list(self.channels),
            "image_size": self.image_size,
            "diffusion_steps": self.diffusion_steps,
            "samplers": list(self.samplers),
            "default_steps": self.default_steps,
            "provenance": self.provenance,
            "sha256": self.sha256,
        }


_hash_cache: dict[tuple[str, tuple[tuple[int, int], ...]], str] = {}
_hash_lock = threading.Lock()


def _cached_sha256(directory: Path) -> str:
    files = [directory.joinpath(n).stat() for n in CHECKPOINT_FILES]
    stats = tuple((st.st_size, st.st_mtime_ns) for st in files)
    key = (str(directory), stats)
    with _hash_lock:
        if key not in _hash_cache:
            _hash_cache[key] = checkpoint_sha256(directory)
        return _hash_cache[key]


def read_model(directory: Path) -> ModelInfo:
    """ModelInfo of one checkpoint directory; ValueError with a one-line reason if unusable."""
    for name in CHECKPOINT_FILES:
        if not (directory / name).is_file():
            raise ValueError(f"{directory} has no {name}")
    cfg = json.loads((directory / "config.json").read_text())
    channel_set = cfg["channel_set"]
    if channel_set not in CHANNEL_SETS:
        raise ValueError(f"{directory}: unknown channel_set {channel_set!r}")
    sha256 = _cached_sha256(directory)
    return ModelInfo(
        name=directory.name,
        channel_set=channel_set,
        channels=CHANNEL_SETS[channel_set],
        image_size=int(cfg["model"]["image_size"]),
        diffusion_steps=int(cfg["diffusion"]["steps"]),
        provenance=dict(cfg.get("provenance", {})),
        sha256=sha256,
        path=directory,
        card=read_card(directory, sha256),
    )


def scan_models(models_dir: str | Path) -> dict[str, ModelInfo]:
    """All usable checkpoints under `models_dir` by name; unreadable ones are skipped."""
    root = Path(models_dir)
    found: dict[str, ModelInfo] = {}
    if not root.is_dir():
        return found
    for directory in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        try:
            found[directory.name] = read_model(directory)
        except (OSError, ValueError, KeyError, TypeError):
            continue
    return found


def resolve_model(models: dict[str, ModelInfo], model: str | None, channels: str | None) -> ModelInfo:
    """The model a request names, or the one that serves its channel set (exact, else smallest superset)."""
    if not models:
        raise RegistryError("no models are installed on this server (the models directory is empty)")
    if model is not None:
        if model not in models:
            raise RegistryError(f"unknown model {model!r}; available: {', '.join(sorted(models))}")
        info = models[model]
        if channels is not None and not set(CHANNEL_SETS[channels]) <= set(info.channels):
            raise RegistryError(
                f"model {model!r} generates {info.channel_set}, which does not include {channels!r}"
            )
        return info
    assert channels is not None
    name = resolve_for_channels(channels, {n: m.channel_set for n, m in models.items()})
    if name is None:
        sets = sorted({m.channel_set for m in models.values()})
        raise RegistryError(
            f"no installed model generates {channels!r}; available channel sets: {', '.join(sets)}"
        )
    return models[name]
