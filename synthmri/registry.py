"""The model registry: every checkpoint directory under the models dir, read from config.json.

Torch-free (the API uses it): config.json is read as plain JSON, the weights are verified
structurally (synthmri.weights), and both the sha256 and the verification are cached by
file size and mtime, so listing models does not reread the weights.

A directory that fails any check is *unavailable*, with a one-line reason that names no
server path; so is a checkpoint a worker could not load (the API passes those faults in).
Requests are only ever resolved among available models. The tie rule for a request that
names a channel set: a model with exactly those channels first, else the one with the
fewest channels that include them; among equals, the first model name in alphabetical
order. Name a model with `model` to choose another.
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from synthmri.channels import CHANNEL_SETS, resolve_for_channels
from synthmri.contract import DEFAULT_STEPS, SAMPLERS, Sampler, resolve_sampling
from synthmri.given import ModelSlices
from synthmri.hashing import CHECKPOINT_FILES, checkpoint_sha256
from synthmri.modelcard import CARD_FILE, read_card, recommendation
from synthmri.weights import verify_safetensors


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
    slices: ModelSlices | None = None  # what a known channel must fit (from config.json)

    def model_slices(self) -> ModelSlices:
        return self.slices or ModelSlices(self.name, self.channels, self.image_size)

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


@dataclass(frozen=True)
class Unavailable:
    """A model directory that cannot serve requests, and why."""

    name: str
    reason: str
    channel_set: str | None = None
    sha256: str | None = None

    def public(self) -> dict[str, Any]:
        return {
            "name": self.name, "reason": self.reason, "channel_set": self.channel_set, "sha256": self.sha256
        }  # fmt: skip


@dataclass(frozen=True)
class Registry:
    """The models directory as the API sees it: usable models and unavailable ones."""

    models: dict[str, ModelInfo]
    unavailable: dict[str, Unavailable]

    def without_faults(self, faults: dict[str, str]) -> Registry:
        """Move models whose checkpoint (by sha256) a worker failed to load to `unavailable`."""
        if not faults:
            return self
        models, unavailable = dict(self.models), dict(self.unavailable)
        for name, info in self.models.items():
            if info.sha256 in faults:
                del models[name]
                reason = f"a worker could not load it: {faults[info.sha256]}"
                unavailable[name] = Unavailable(name, reason, info.channel_set, info.sha256)
        return Registry(models, dict(sorted(unavailable.items())))


class ModelUnusable(ValueError):
    """A checkpoint directory that cannot be served; the message names no server path."""


_cache: dict[tuple[str, tuple[tuple[int, int], ...]], tuple[str, str | None]] = {}
_cache_lock = threading.Lock()


def _checked_sha256(directory: Path) -> str:
    """The checkpoint sha256, after verifying the weights; both cached by size and mtime."""
    files = [directory.joinpath(n).stat() for n in CHECKPOINT_FILES]
    stats = tuple((st.st_size, st.st_mtime_ns) for st in files)
    key = (str(directory), stats)
    with _cache_lock:
        cached = _cache.get(key)
    if cached is None:
        try:
            verify_safetensors(directory / CHECKPOINT_FILES[0])
            problem = None
        except ValueError as e:
            problem = str(e)
        cached = (checkpoint_sha256(directory), problem)
        with _cache_lock:
            _cache[key] = cached
    if cached[1] is not None:
        raise ModelUnusable(cached[1])
    return cached[0]


_infos: dict[str, tuple[tuple[tuple[int, int, int], ...], ModelInfo]] = {}


def _file_stats(directory: Path) -> tuple[tuple[int, int, int], ...]:
    """(inode, size, mtime) of the files a ModelInfo is read from; (0, 0, 0) for a missing one."""
    out = []
    for name in (*CHECKPOINT_FILES, CARD_FILE):
        try:
            st = directory.joinpath(name).stat()
            out.append((st.st_ino, st.st_size, st.st_mtime_ns))
        except FileNotFoundError:
            out.append((0, 0, 0))
    return tuple(out)


def read_model(directory: Path) -> ModelInfo:
    """ModelInfo of one checkpoint directory; ModelUnusable with a one-line reason if unusable.

    Every submission resolves its model from a fresh scan, so a directory whose files are
    unchanged (same inode, size and mtime) answers from the last read instead of parsing its
    config and model card again.
    """
    stats = _file_stats(directory)
    with _cache_lock:
        cached = _infos.get(str(directory))
    if cached is not None and cached[0] == stats:
        return cached[1]
    info = _read_model(directory)
    with _cache_lock:
        _infos[str(directory)] = (stats, info)
    return info


def _read_model(directory: Path) -> ModelInfo:
    for name in CHECKPOINT_FILES:
        if not (directory / name).is_file():
            raise ModelUnusable(f"it has no {name}")
    try:
        cfg = json.loads((directory / "config.json").read_text())
        channel_set = cfg["channel_set"]
        image_size = int(cfg["model"]["image_size"])
        diffusion_steps = int(cfg["diffusion"]["steps"])
        provenance = dict(cfg.get("provenance", {}))
        slices = ModelSlices.from_config(directory.name, cfg) if channel_set in CHANNEL_SETS else None
    except (ValueError, KeyError, TypeError, AttributeError, UnicodeDecodeError):
        raise ModelUnusable("its config.json is not a readable checkpoint config") from None
    if channel_set not in CHANNEL_SETS:
        raise ModelUnusable(f"its config.json names an unknown channel set {str(channel_set)[:40]!r}")
    sha256 = _checked_sha256(directory)
    return ModelInfo(
        name=directory.name,
        channel_set=channel_set,
        channels=CHANNEL_SETS[channel_set],
        image_size=image_size,
        diffusion_steps=diffusion_steps,
        provenance=provenance,
        sha256=sha256,
        path=directory,
        card=read_card(directory, sha256),
        slices=slices,
    )


def _channel_set_of(directory: Path) -> str | None:
    try:
        value = json.loads((directory / "config.json").read_text()).get("channel_set")
    except (OSError, ValueError, AttributeError, UnicodeDecodeError):
        return None
    return value if value in CHANNEL_SETS else None


def scan_registry(models_dir: str | Path) -> Registry:
    """Every checkpoint directory under `models_dir`: the usable ones and, with reasons, the rest."""
    root = Path(models_dir)
    found: dict[str, ModelInfo] = {}
    unavailable: dict[str, Unavailable] = {}
    if not root.is_dir():
        return Registry(found, unavailable)
    for directory in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        try:
            found[directory.name] = read_model(directory)
        except ModelUnusable as e:
            unavailable[directory.name] = Unavailable(directory.name, str(e), _channel_set_of(directory))
        except OSError as e:
            reason = f"it cannot be read ({e.strerror or type(e).__name__})"
            unavailable[directory.name] = Unavailable(directory.name, reason)
    return Registry(found, unavailable)


def scan_models(models_dir: str | Path) -> dict[str, ModelInfo]:
    """The usable checkpoints under `models_dir` by name (see `scan_registry` for the rest)."""
    return scan_registry(models_dir).models


def resolve_model(
    models: dict[str, ModelInfo],
    model: str | None,
    channels: str | None,
    unavailable: dict[str, Unavailable] | None = None,
) -> ModelInfo:
    """The model a request names, or the one that serves its channel set (the tie rule is in
    this module's docstring). Only `models` are candidates; `unavailable` ones are named in
    the error when a request asks for them."""
    unavailable = unavailable or {}
    if model is not None and model in unavailable:
        raise RegistryError(
            f"model {model!r} is unavailable: {unavailable[model].reason}"
            + (f"; available: {', '.join(sorted(models))}" if models else "")
        )
    if not models:
        if unavailable:
            raise RegistryError(
                "no model on this server is available (see GET /v1/models for why: "
                + "; ".join(f"{u.name}: {u.reason}" for u in unavailable.values())[:300]
                + ")"
            )
        raise RegistryError("no models are installed on this server (the models directory is empty)")
    if model is not None:
        if model not in models:
            raise RegistryError(f"unknown model {model[:60]!r}; available: {', '.join(sorted(models))}")
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
        down = [u for u in unavailable.values() if u.channel_set == channels]
        raise RegistryError(
            f"no available model generates {channels!r}; available channel sets: {', '.join(sets)}"
            + "".join(f"; model {u.name!r} would, but is unavailable: {u.reason}" for u in down[:3])
        )
    return models[name]
