"""Samplers: short pure functions over a denoiser callable, one signature, one registry.

Every sampler is `sample_x(model_fn, diffusion, x_T, *, steps, noise, progress=None,
should_stop=None, **kw) -> x_0`. It respaces the diffusion's T steps to `steps`, calls
`model_fn(x_t, t_original)` with the ORIGINAL timesteps the network was trained on, draws
any step noise through `noise(x)` (a `PerSampleNoise.randn_like` keeps each sample on its
own stream), reports `progress(done, total)` after each step and raises `SamplingCancelled`
when `should_stop()` says so. Conditioning wraps `model_fn`; samplers grow no flags for it.
All arithmetic is float32 whatever the network's dtype.

Every sampler runs under `torch.inference_mode()` itself: no step's autograd graph is kept,
and the network sees the same grad state (and so takes the same batch-invariant kernels)
whether or not the caller opened a no-grad context.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from model.diffusion import MAX_BETA, GaussianDiffusion, space_timesteps

ModelFn = Callable[[Tensor, Tensor], Tensor]
NoiseFn = Callable[[Tensor], Tensor]
ProgressFn = Callable[[int, int], None]
StopFn = Callable[[], bool]


class SamplingCancelled(Exception):
    """Raised between steps when the caller's `should_stop()` returns True."""


# ---------------------------------------------------------------------------- shared plumbing
def _respaced(diffusion: GaussianDiffusion, steps: int) -> GaussianDiffusion:
    T = diffusion.num_timesteps
    if not 1 <= int(steps) <= T:
        raise ValueError(f"steps must be between 1 and {T} (the model's diffusion steps), got {steps}")
    return diffusion.respace(space_timesteps(T, int(steps)))


def _check_stop(should_stop: StopFn | None, done: int, total: int) -> None:
    if should_stop is not None and should_stop():
        raise SamplingCancelled(f"sampling cancelled after {done} of {total} steps")


def _model_output(model_fn: ModelFn, d: GaussianDiffusion, x: Tensor, i: int) -> tuple[Tensor, Tensor]:
    """(raw float32 output, respaced t) of the network at respaced step i."""
    t = torch.full((x.shape[0],), i, dtype=torch.long, device=x.device)
    t_original = d.timestep_map.to(x.device)[t]
    return model_fn(x, t_original).float(), t


def _as_float32(x_T: Tensor) -> Tensor:
    if x_T.ndim < 2:
        raise ValueError(f"x_T must be a batch (N, C, ...), got shape {tuple(x_T.shape)}")
    return x_T.detach().float()


# ---------------------------------------------------------------------------- ancestral DDPM
def ddpm_step(mean: Tensor, log_variance: Tensor, z: Tensor | None) -> Tensor:
    """x_{t-1} = μ_θ + σ_θ z (Ho et al. Alg. 2); no noise on the last step."""
    if z is None:
        return mean
    return mean + torch.exp(0.5 * log_variance) * z


@torch.inference_mode()
def sample_ddpm(
    model_fn: ModelFn,
    diffusion: GaussianDiffusion,
    x_T: Tensor,
    *,
    steps: int,
    noise: NoiseFn,
    progress: ProgressFn | None = None,
    should_stop: StopFn | None = None,
    clip_denoised: bool = True,
) -> Tensor:
    """Ancestral sampling over a respaced schedule, with the learned variance when σ is learned."""
    d = _respaced(diffusion, steps)
    x = _as_float32(x_T)
    for done, i in enumerate(reversed(range(d.num_timesteps))):
        _check_stop(should_stop, done, d.num_timesteps)
        out, t = _model_output(model_fn, d, x, i)
        p = d.p_mean_variance(out, x, t, clip_denoised=clip_denoised)
        x = ddpm_step(p["mean"], p["log_variance"], noise(x) if i > 0 else None)
        if progress is not None:
            progress(done + 1, d.num_timesteps)
    return x


# ---------------------------------------------------------------------------- DDIM
def ddim_coefficients(ab: float, ab_prev: float, eta: float) -> tuple[float, float, float]:
    """(c_x0, c_eps, σ) of x_prev = c_x0·x̂_0 + c_eps·ε̂ + σ z (Song et al. 2021, eq. 12 and 16)."""
    sigma = eta * math.sqrt((1 - ab_prev) / (1 - ab) * (1 - ab / ab_prev))
    return math.sqrt(ab_prev), math.sqrt(max(1 - ab_prev - sigma**2, 0.0)), sigma


@torch.inference_mode()
def sample_ddim(
    model_fn: ModelFn,
    diffusion: GaussianDiffusion,
    x_T: Tensor,
    *,
    steps: int,
    noise: NoiseFn,
    progress: ProgressFn | None = None,
    should_stop: StopFn | None = None,
    eta: float = 0.0,
    clip_denoised: bool = True,
) -> Tensor:
    """DDIM (Song et al. 2021): deterministic for η = 0, η = 1 matches DDPM's posterior variance."""
    if eta < 0:
        raise ValueError(f"eta must be ≥ 0, got {eta}")
    d = _respaced(diffusion, steps)
    x = _as_float32(x_T)
    for done, i in enumerate(reversed(range(d.num_timesteps))):
        _check_stop(should_stop, done, d.num_timesteps)
        out, t = _model_output(model_fn, d, x, i)
        pred_xstart, eps = d.predict_xstart_and_eps(out, x, t)
        if clip_denoised:
            pred_xstart = pred_xstart.clamp(-1.0, 1.0)
            # Re-derive ε from the clipped x̂_0 so the step stays on the line through x_t.
            eps = d.predict_eps_from_xstart(x, t, pred_xstart)
        ab, ab_prev = d.alphas_cumprod[i].item(), d.alphas_cumprod_prev[i].item()
        c_x0, c_eps, sigma = ddim_coefficients(ab, ab_prev, eta)
        x = c_x0 * pred_xstart + c_eps * eps
        if sigma > 0:
            x = x + sigma * noise(x)
        if progress is not None:
            progress(done + 1, d.num_timesteps)
    return x


# ---------------------------------------------------------------------------- DPM-Solver++(2M)
def log_snr(alphas_cumprod: Tensor) -> Tensor:
    """λ_t = log(α_t/σ_t) = ½ log(ᾱ_t/(1 − ᾱ_t)) of the discrete schedule."""
    return 0.5 * (torch.log(alphas_cumprod) - torch.log1p(-alphas_cumprod))


def smooth_end(diffusion: GaussianDiffusion) -> int:
    """The largest t whose β is not clipped at MAX_BETA: λ is smooth in t up to there.

    The cosine schedule's last β is clipped at 0.999, so λ jumps from −6.46 at t = 998 to
    −9.92 at t = 999; a λ grid that started at −9.92 spent 9 of 20 steps on t ≥ 991.
    """
    t = diffusion.num_timesteps - 1
    while t > 0 and diffusion.betas[t].item() >= MAX_BETA * (1 - 1e-9):
        t -= 1
    return t


def dpmpp_timesteps(diffusion: GaussianDiffusion, steps: int, spacing: str = "logsnr") -> list[int]:
    """`steps` distinct integer t of the diffusion, uniform in t or in λ (largest t = T-1, smallest 0).

    The λ grid spans λ(0) … λ(`smooth_end`); its top point is then moved to T-1, so sampling
    starts from pure noise and the first (first-order) step crosses any clipped jump.
    """
    T = diffusion.num_timesteps
    if not 1 <= steps <= T:
        raise ValueError(f"steps must be between 1 and {T} (the model's diffusion steps), got {steps}")
    if spacing == "uniform":
        return space_timesteps(T, steps)
    if spacing != "logsnr":
        raise ValueError(f"unknown time spacing {spacing!r}; expected 'logsnr' or 'uniform'")
    if steps == 1:
        return [T - 1]
    lam = log_snr(diffusion.alphas_cumprod)  # decreasing in t
    targets = torch.linspace(lam[smooth_end(diffusion)].item(), lam[0].item(), steps, dtype=torch.float64)
    # Nearest integer t for each target λ (λ is monotone, so interpolate t as a function of λ).
    t_cont = _interp(targets, lam.flip(0), torch.arange(T - 1, -1, -1, dtype=torch.float64))
    ts = [math.floor(v + 0.5) for v in t_cont.tolist()]  # descending
    ts.reverse()  # ascending from t = 0
    ts[-1] = T - 1
    # Several targets can round to one t near t = 0, where λ jumps: push them apart, stay in range.
    for k in range(1, steps):
        ts[k] = max(ts[k], ts[k - 1] + 1)
    ts[-1] = min(ts[-1], T - 1)
    for k in range(steps - 2, -1, -1):
        ts[k] = min(ts[k], ts[k + 1] - 1)
    return ts


def _interp(x: Tensor, xp: Tensor, fp: Tensor) -> Tensor:
    """Piecewise-linear interpolation of increasing xp → fp at x (clamped to the ends)."""
    idx = torch.searchsorted(xp, x).clamp(1, xp.numel() - 1)
    x0, x1, f0, f1 = xp[idx - 1], xp[idx], fp[idx - 1], fp[idx]
    w = ((x - x0) / (x1 - x0)).clamp(0.0, 1.0)
    return f0 + w * (f1 - f0)


def dpmpp_2m_step(
    x: Tensor,
    x0: Tensor,
    x0_prev: Tensor | None,
    *,
    sigma: float,
    sigma_next: float,
    alpha_next: float,
    h: float,
    h_prev: float | None,
) -> Tensor:
    """One DPM-Solver++(2M) step (Lu et al. 2022, Alg. 2) from λ to λ + h in data prediction.

    x_next = (σ_next/σ) x − α_next (e^{−h} − 1) D with D = x̂_0 (first order) or
    D = (1 + 1/(2r)) x̂_0 − 1/(2r) x̂_0,prev, r = h_prev/h (second order, multistep).
    """
    if x0_prev is None or h_prev is None:
        d = x0
    else:
        r = h_prev / h
        d = (1 + 1 / (2 * r)) * x0 - (1 / (2 * r)) * x0_prev
    return (sigma_next / sigma) * x - alpha_next * math.expm1(-h) * d


def _dpmpp_multistep(
    model_fn: ModelFn,
    diffusion: GaussianDiffusion,
    x_T: Tensor,
    step: Callable[..., Tensor],
    *,
    steps: int,
    progress: ProgressFn | None,
    should_stop: StopFn | None,
    spacing: str,
    clip_denoised: bool,
) -> Tensor:
    """The DPM-Solver++ loop over the log-SNR grid; `step` moves x from one λ to the next.

    The first step has no history; the last (to λ = ∞, i.e. t = 0) returns x̂_0 itself,
    the limit of every update there.
    """
    d = diffusion.respace(dpmpp_timesteps(diffusion, int(steps), spacing))
    n = d.num_timesteps
    ab = d.alphas_cumprod
    alpha, sigma, lam = ab.sqrt().tolist(), (1 - ab).sqrt().tolist(), log_snr(ab).tolist()
    x = _as_float32(x_T)
    x0_prev: Tensor | None = None
    h_prev: float | None = None
    for done, i in enumerate(reversed(range(n))):
        _check_stop(should_stop, done, n)
        out, t = _model_output(model_fn, d, x, i)
        x0, _ = d.predict_xstart_and_eps(out, x, t)
        if clip_denoised:
            x0 = x0.clamp(-1.0, 1.0)
        if i == 0:
            x = x0
        else:
            h = lam[i - 1] - lam[i]
            x = step(x, x0, x0_prev, sigma=sigma[i], sigma_next=sigma[i - 1], alpha_next=alpha[i - 1],
                     h=h, h_prev=h_prev)  # fmt: skip
            x0_prev, h_prev = x0, h
        if progress is not None:
            progress(done + 1, n)
    return x


@torch.inference_mode()
def sample_dpmpp_2m(
    model_fn: ModelFn,
    diffusion: GaussianDiffusion,
    x_T: Tensor,
    *,
    steps: int,
    noise: NoiseFn,
    progress: ProgressFn | None = None,
    should_stop: StopFn | None = None,
    spacing: str = "logsnr",
    clip_denoised: bool = True,
) -> Tensor:
    """DPM-Solver++(2M) in the log-SNR λ of the discrete ᾱ: `steps` network calls, deterministic.

    The first step (no history) and the last (to λ = ∞, i.e. returning x̂_0 at t = 0) are
    first order. `noise` is unused: the solver integrates the probability-flow ODE.
    """
    del noise
    return _dpmpp_multistep(
        model_fn, diffusion, x_T, dpmpp_2m_step,
        steps=steps, progress=progress, should_stop=should_stop, spacing=spacing, clip_denoised=clip_denoised,
    )  # fmt: skip


def dpmpp_2m_sde_step(
    x: Tensor,
    x0: Tensor,
    x0_prev: Tensor | None,
    z: Tensor,
    *,
    sigma: float,
    sigma_next: float,
    alpha_next: float,
    h: float,
    h_prev: float | None,
) -> Tensor:
    """One SDE-DPM-Solver++(2M) step (Lu et al. 2022, §5; midpoint form) from λ to λ + h.

    x_next = (σ_next/σ) e^{−h} x + α_next (1 − e^{−2h}) (D₀ + ½ D₁) + σ_next √(1 − e^{−2h}) z with
    D₀ = x̂_0 and D₁ = (x̂_0 − x̂_0,prev)/r, r = h_prev/h (0 on the first step).
    """
    d = x0 if x0_prev is None or h_prev is None else x0 + 0.5 * (x0 - x0_prev) * (h / h_prev)
    decay = math.exp(-h)
    return (sigma_next / sigma) * decay * x + alpha_next * (-math.expm1(-2 * h)) * d + sigma_next * math.sqrt(
        -math.expm1(-2 * h)
    ) * z


@torch.inference_mode()
def sample_dpmpp_2m_sde(
    model_fn: ModelFn,
    diffusion: GaussianDiffusion,
    x_T: Tensor,
    *,
    steps: int,
    noise: NoiseFn,
    progress: ProgressFn | None = None,
    should_stop: StopFn | None = None,
    spacing: str = "logsnr",
    clip_denoised: bool = True,
) -> Tensor:
    """SDE-DPM-Solver++(2M): DPM-Solver++'s multistep data prediction with fresh noise each step.

    The same λ grid and network calls as `sample_dpmpp_2m`; the injected noise keeps
    correcting the path as ancestral sampling does (at 20 steps), where the deterministic
    ODE carries early errors to the end — e.g. stray pixels in a label channel.
    """

    def step(x: Tensor, x0: Tensor, x0_prev: Tensor | None, **grid: Any) -> Tensor:
        return dpmpp_2m_sde_step(x, x0, x0_prev, noise(x), **grid)

    return _dpmpp_multistep(
        model_fn, diffusion, x_T, step,
        steps=steps, progress=progress, should_stop=should_stop, spacing=spacing, clip_denoised=clip_denoised,
    )  # fmt: skip


SamplerFn = Callable[..., Tensor]

SAMPLERS: dict[str, SamplerFn] = {
    "ddpm": sample_ddpm,
    "ddim": sample_ddim,
    "dpm++": sample_dpmpp_2m,
    "dpm++sde": sample_dpmpp_2m_sde,
}

DEFAULT_STEPS: dict[str, int] = {"ddpm": 1000, "ddim": 50, "dpm++": 20, "dpm++sde": 20}
