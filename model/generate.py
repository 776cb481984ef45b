"""Deterministic batched sampling: the one entry point the CLI and the worker share.

Determinism contract: sample `i` of a request with seed `s` takes its x_T and every
stochastic step's noise from its own generator seeded by `(s, i)` (model.seeding), so
it does not depend on the count, the batch size or its batch neighbours.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch

from model.config import CheckpointConfig
from model.seeding import PerSampleNoise
from synthmri.channels import SEG, decode_labels

if TYPE_CHECKING:
    from model.checkpoint import LoadedCheckpoint

ProgressFn = Callable[[int, int], None]
StopFn = Callable[[], bool]


def resolve_steps(sampler: str, steps: int | None) -> int:
    """The sampler's step count: the request's, or the sampler's default."""
    from model.samplers import DEFAULT_STEPS, SAMPLERS

    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; known: {', '.join(SAMPLERS)}")
    if steps is None:
        return int(DEFAULT_STEPS[sampler])
    if steps < 1:
        raise ValueError(f"steps must be ≥ 1, got {steps}")
    return int(steps)


def batches(indices: Sequence[int], batch_size: int) -> list[list[int]]:
    """Split sample indices, in order, into consecutive batches of at most `batch_size`."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be ≥ 1, got {batch_size}")
    idx = [int(i) for i in indices]
    return [idx[k : k + batch_size] for k in range(0, len(idx), batch_size)]


@torch.inference_mode()
def generate(
    ckpt: LoadedCheckpoint,
    *,
    seed: int,
    indices: Sequence[int],
    sampler: str,
    steps: int | None = None,
    batch_size: int = 8,
    device: str | torch.device = "cpu",
    progress: ProgressFn | None = None,
    should_stop: StopFn | None = None,
    precision: str = "auto",
) -> np.ndarray:
    """Sample `indices` of request `seed`; returns (N, C, H, W) float32 in [-1, 1].

    Progress is reported as (steps done, total steps) summed over all batches;
    `should_stop` is passed to the sampler, which raises `SamplingCancelled`.
    """
    from model.samplers import SAMPLERS

    n_steps = resolve_steps(sampler, steps)
    groups = batches(indices, batch_size)
    cfg = ckpt.config
    shape = (len(cfg.channels), cfg.image_size, cfg.image_size)
    model_fn = ckpt.model_fn(device, precision)
    sample_fn = SAMPLERS[sampler]

    total = n_steps * len(groups)
    out: list[np.ndarray] = []
    for b, group in enumerate(groups):
        noise = PerSampleNoise(seed, group)
        # x_T is the first draw from each sample's stream; step noise continues the same stream.
        x_T = noise.randn(shape, device=device)
        batch_progress = None
        if progress is not None:
            offset = b * n_steps

            def batch_progress(done: int, _total: int, offset: int = offset) -> None:
                progress(offset + done, total)

        x_0 = sample_fn(
            model_fn,
            ckpt.diffusion,
            x_T,
            steps=n_steps,
            noise=noise.randn_like,
            progress=batch_progress,
            should_stop=should_stop,
        )
        out.append(x_0.detach().float().clamp(-1.0, 1.0).cpu().numpy())
    if not out:
        return np.zeros((0, *shape), dtype=np.float32)
    return np.concatenate(out).astype(np.float32, copy=False)


def decode_sample(x: np.ndarray, config: CheckpointConfig) -> dict[str, np.ndarray]:
    """One (C, H, W) sample → {channel: image float32 in [0, 1] | seg uint8 BraTS labels}."""
    x = np.asarray(x, dtype=np.float32)
    channels = config.channels
    if x.ndim != 3 or x.shape[0] != len(channels):
        raise ValueError(f"expected a ({len(channels)}, H, W) sample for {channels}, got {x.shape}")
    levels: Mapping[int, float] = config.label_levels
    decoded: dict[str, np.ndarray] = {}
    for c, name in enumerate(channels):
        if name == SEG:
            decoded[name] = decode_labels(x[c], levels)
        else:
            decoded[name] = np.clip((x[c] + 1.0) / 2.0, 0.0, 1.0).astype(np.float32)
    return decoded
