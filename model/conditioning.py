"""Generation with known channels: a joint model fills in the rest by inpainting in channel space.

A model trained on (T1, T1CE, T2, FLAIR, seg) learns their joint distribution, so at
sampling time any subset of channels (optionally only inside a pixel mask) can be fixed
and the others generated to match, with no retraining: a tumour mask → the images, a
T1CE slice → the other sequences.

`KnownChannels` wraps a model function; every sampler takes it unchanged. At each call
it replaces the network's x̂_0 of the known pixels with their known values and returns
the output in the model's own parametrisation (ε or v, plus the variance channels). So
the sampler's state keeps the known pixels on a correctly noised path — the posterior
q(x_{t-1} | x_t, x_0 = known) for ancestral sampling, the deterministic noising path of
its own starting noise for DDIM and DPM-Solver++ — the network sees them at every step
and conditions the unknown pixels on them, and the last step returns them exactly.
Nothing here draws random numbers, so determinism by (seed, i) is untouched.

Known limit (measured with the exact denoiser of a few slices, tests/model/test_conditioning.py):
replacement alone conditions on the known channels only as noisy as x_t itself, so at
high noise the unknown channels can commit to another slice than the known ones name,
most often with the deterministic samplers. It keeps known pixels exact; coherence of
the rest needs resampling (RePaint) or reconstruction guidance on top.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from model.diffusion import GaussianDiffusion

ModelFn = Callable[[Tensor, Tensor], Tensor]


class KnownChannels:
    """model_fn(x_t, t) whose x̂_0 equals `known` where `mask` is 1 (blends where it is fractional).

    `diffusion` is the un-respaced diffusion the network was trained with (samplers call
    model functions with original timesteps). `known` is (N, C, H, W) in the model range;
    `mask` broadcasts against it: (C,) for whole channels, (N, C, H, W) for pixels.
    """

    def __init__(self, model_fn: ModelFn, diffusion: GaussianDiffusion, known: Tensor, mask: Tensor) -> None:
        if known.ndim != 4:
            raise ValueError(f"known must be (N, C, H, W), got shape {tuple(known.shape)}")
        mask = torch.as_tensor(mask, dtype=torch.float32)
        if mask.ndim == 1:
            mask = mask.view(1, -1, 1, 1)
        try:
            mask = torch.broadcast_to(mask, known.shape)
        except RuntimeError:
            raise ValueError(
                f"mask of shape {tuple(mask.shape)} does not fit known channels {tuple(known.shape)}"
            ) from None
        if bool(((mask < 0) | (mask > 1)).any()):
            raise ValueError("mask values must lie in [0, 1]")
        self.model_fn = model_fn
        self.diffusion = diffusion
        self.known = known.float()
        self.mask = mask.float()

    @torch.inference_mode()
    def __call__(self, x_t: Tensor, t: Tensor) -> Tensor:
        if x_t.shape != self.known.shape:
            raise ValueError(f"x_t of shape {tuple(x_t.shape)} but known channels {tuple(self.known.shape)}")
        out = self.model_fn(x_t, t).float()
        d = self.diffusion
        known, mask = self.known.to(x_t.device), self.mask.to(x_t.device)
        per_sample = (-1, *([1] * (x_t.ndim - 1)))
        alpha = d.sqrt_alphas_cumprod.float().to(x_t.device)[t].view(per_sample)
        sigma = d.sqrt_one_minus_alphas_cumprod.float().to(x_t.device)[t].view(per_sample)
        # The output that predicts x̂_0 = known; the output is affine in x̂_0 for a given x_t, so
        # blending outputs blends the x̂_0 they predict.
        eps = (x_t - alpha * known) / sigma
        pinned = eps if d.prediction == "eps" else alpha * eps - sigma * known
        mean_out, u = d.split_model_output(out, x_t)
        # Unknown pixels keep the network's own output bit for bit.
        mean_out = torch.where(mask > 0, mask * pinned + (1 - mask) * mean_out, mean_out)
        return mean_out if u is None else torch.cat([mean_out, u], dim=1)
