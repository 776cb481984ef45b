"""The evaluation's quick figures, cheap enough to run at every training checkpoint.

- x̂_0 error at high noise: RMSE of the network's x̂_0 on validation slices at t/T =
  0.5, 0.9, 0.95, 0.98 with fixed noise. A network that has not learned the layout of a
  slice does worse here than predicting the mean slice, and fast samplers then fail.
- a few samples with the fast sampler and their slice anatomy and mask figures, next to
  the same figures of the validation slices.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from model.diffusion import GaussianDiffusion
from model.seeding import PerSampleNoise
from training.evaluation.morphology import decode, slice_figures

NOISE_FRACTIONS = (0.5, 0.9, 0.95, 0.98)
QUICK_KEYS = (
    "background_fraction",
    "one_brain",
    "tumour_components",
    "isolated_tumour_pixels",
    "tumour_outside_brain",
)


@torch.inference_mode()
def xstart_rmse(
    model_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    diffusion: GaussianDiffusion,
    x0: torch.Tensor,
    seed: int = 0,
) -> dict[str, float]:
    """RMSE of x̂_0 (unclipped) at each noise fraction, and that of predicting the batch's mean slice."""
    T = diffusion.num_timesteps
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(x0.shape, generator=g).to(x0.device)
    out = {"mean_slice": float(((x0 - x0.mean(dim=0, keepdim=True)) ** 2).mean().sqrt())}
    for f in NOISE_FRACTIONS:
        t = torch.full((x0.shape[0],), min(T - 1, round(f * T)), dtype=torch.long, device=x0.device)
        x_t = diffusion.q_sample(x0, t, noise)
        pred, _ = diffusion.predict_xstart_and_eps(model_fn(x_t, t).float(), x_t, t)
        out[f"t{int(t[0])}"] = float(((pred - x0) ** 2).mean().sqrt())
    return out


@torch.inference_mode()
def sample_figures(
    model_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    diffusion: GaussianDiffusion,
    channels: Sequence[str],
    image_size: int,
    *,
    count: int = 16,
    sampler: str = "dpm++",
    steps: int = 20,
    seed: int = 0,
    device: torch.device | str = "cpu",
) -> dict[str, float]:
    """Slice figures of `count` samples (request `seed`, indices 0…count-1)."""
    from model.samplers import SAMPLERS

    noise = PerSampleNoise(seed, list(range(count)))
    x_T = noise.randn((len(channels), image_size, image_size), device=device)
    x = SAMPLERS[sampler](model_fn, diffusion, x_T, steps=steps, noise=noise.randn_like)
    figures = slice_figures(decode(x.clamp(-1, 1).cpu().numpy(), channels))
    return {k: figures[k] for k in QUICK_KEYS if k in figures}


def real_figures(x: np.ndarray, channels: Sequence[str]) -> dict[str, float]:
    figures = slice_figures(decode(x, channels))
    return {k: figures[k] for k in QUICK_KEYS if k in figures}


def quick_record(
    model_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    diffusion: GaussianDiffusion,
    channels: Sequence[str],
    val: torch.Tensor,
    real: dict[str, float],
    **sample_kw: Any,
) -> dict[str, Any]:
    """One metrics.jsonl record: x̂_0 RMSE per noise level and sample figures beside the real ones."""
    return {
        "xstart_rmse": xstart_rmse(model_fn, diffusion, val),
        "samples": sample_figures(
            model_fn, diffusion, channels, val.shape[-1], device=val.device, **sample_kw
        ),
        "real": real,
    }
