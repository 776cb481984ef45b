"""The exact denoiser of a finite set of slices: samplers and metrics tested without a trained net.

When the data distribution is uniform over K known slices x_k, the posterior is a
softmax over them, w_k ∝ exp(−‖x_t − √ᾱ_t x_k‖² / 2(1 − ᾱ_t)), and E[x_0 | x_t] = Σ w_k x_k
in closed form. A correct sampler driven by it returns (nearly) one of the x_k; a
correct metric scores those samples like the real slices.
"""

from __future__ import annotations

import torch

from model.diffusion import GaussianDiffusion


class SliceSetDenoiser:
    """model_fn(x_t, t) for data uniform over `slices` (K, C, H, W), in the diffusion's parametrisation."""

    def __init__(self, diffusion: GaussianDiffusion, slices: torch.Tensor) -> None:
        self.d = diffusion  # un-respaced: the network only ever sees original timesteps
        self.slices = slices.double()

    def posterior_mean(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        n = x_t.shape[0]
        ab = self.d.alphas_cumprod[t.cpu()].view(n, 1)
        x = x_t.double().reshape(n, -1)
        ref = self.slices.reshape(self.slices.shape[0], -1)
        d2 = (x**2).sum(1, keepdim=True) - 2 * ab.sqrt() * x @ ref.T + ab * (ref**2).sum(1)[None]
        w = torch.softmax(-d2 / (2 * (1 - ab)), dim=1)
        return (w @ ref).view(x_t.shape)

    def __call__(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        e = self.posterior_mean(x_t, t)
        n = x_t.shape[0]
        ab = self.d.alphas_cumprod[t.cpu()].view(n, 1, 1, 1)
        eps = (x_t.double() - ab.sqrt() * e) / (1 - ab).sqrt()
        out = eps if self.d.prediction == "eps" else ab.sqrt() * eps - (1 - ab).sqrt() * e
        if self.d.learn_sigma:  # the fixed-small variance: u = −1
            out = torch.cat([out, -torch.ones_like(out)], dim=1)
        return out.float()
