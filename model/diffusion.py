"""Gaussian diffusion process (Ho et al. 2020) with learned-range variance and the hybrid loss.

Follows Nichol & Dhariwal 2021 ("Improved DDPM"): Σ_θ = exp(u log β_t + (1 − u) log β̃_t)
with the network's variance output u ∈ [-1, 1] mapped to [0, 1], and L_hybrid = L_simple +
λ·L_vlb where L_vlb only trains the variance (stop-gradient on the mean). The mean output
predicts ε (Ho et al.) or the velocity v = α_t ε − σ_t x_0 (Salimans & Ho 2022), and
L_simple can be re-weighted per timestep (min-SNR-γ, Hang et al. 2023). The class owns
the float64 schedule tensors; the network is passed into every method.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from model.config import DiffusionConfig

COSINE_S = 0.008  # Nichol & Dhariwal eq. 17 offset: keeps β_0 from being vanishingly small
MAX_BETA = 0.999  # cosine β clip: avoids the singularity at t = T
LOSSES = ("hybrid", "mse")
PREDICTIONS = ("eps", "v")
WEIGHTINGS = ("eps", "v", "min-snr")

ModelFn = Callable[[Tensor, Tensor], Tensor]


def get_named_beta_schedule(name: str, num_diffusion_timesteps: int) -> Tensor:
    """β_0..β_{T-1} (float64) of the "linear" (Ho et al.) or "cosine" (Nichol & Dhariwal) schedule."""
    T = int(num_diffusion_timesteps)
    if T < 1:
        raise ValueError(f"num_diffusion_timesteps must be ≥ 1, got {num_diffusion_timesteps}")
    if name == "linear":
        # Scaled so that any T spans the same total noise as Ho et al.'s T = 1000.
        scale = 1000.0 / T
        return torch.linspace(scale * 1e-4, scale * 0.02, T, dtype=torch.float64)
    if name == "cosine":
        return betas_for_alpha_bar(T, cosine_alpha_bar)
    raise ValueError(f"unknown beta schedule {name!r}; expected 'linear' or 'cosine'")


def cosine_alpha_bar(u: Tensor) -> Tensor:
    """f(u) = cos²((u + s)/(1 + s) · π/2) for u = t/T ∈ [0, 1] (ᾱ_t = f(t/T)/f(0))."""
    return torch.cos((u + COSINE_S) / (1 + COSINE_S) * math.pi / 2) ** 2


def betas_for_alpha_bar(T: int, alpha_bar: Callable[[Tensor], Tensor], max_beta: float = MAX_BETA) -> Tensor:
    """β_t = 1 − ᾱ((t+1)/T)/ᾱ(t/T), clipped at max_beta, for a continuous ᾱ(u) on [0, 1]."""
    u = torch.arange(T + 1, dtype=torch.float64) / T
    ab = alpha_bar(u)
    return (1 - ab[1:] / ab[:-1]).clamp(max=max_beta)


def space_timesteps(num_timesteps: int, section: int | str) -> list[int]:
    """`k` evenly spaced steps of 0..T-1 including both ends, or "ddimK": stride T//K from 0."""
    T = int(num_timesteps)
    if isinstance(section, str):
        spec = section.strip()
        if spec.startswith("ddim"):
            k = _parse_count(spec[4:], section)
            for stride in range(1, T):
                if len(range(0, T, stride)) == k:
                    return list(range(0, T, stride))
            if k == T:
                return list(range(T))
            raise ValueError(f"cannot take exactly {k} steps of {T} with an integer stride ({section!r})")
        section = _parse_count(spec, section)
    k = int(section)
    if not 1 <= k <= T:
        raise ValueError(f"cannot space {k} steps out of {T}: need 1 ≤ steps ≤ {T}")
    if k == 1:
        return [T - 1]
    step = (T - 1) / (k - 1)
    # floor(x + 0.5), not round(): banker's rounding could merge neighbours when the step ≈ 1.
    return [math.floor(i * step + 0.5) for i in range(k)]


def _parse_count(text: str, original: str) -> int:
    if not text.isdigit():
        raise ValueError(f"bad timestep spacing {original!r}; expected an integer or 'ddimK'")
    return int(text)


def _extract(arr: Tensor, t: Tensor, shape: Sequence[int], dtype: torch.dtype = torch.float32) -> Tensor:
    """arr[t] broadcastable against `shape` (N, ...): one gather, no loop over the batch."""
    # Cast before moving: float64 is not available on every accelerator.
    vals = arr.to(dtype).to(t.device)[t.long()]
    return vals.reshape(t.shape[0], *([1] * (len(shape) - 1)))


def mean_flat(x: Tensor) -> Tensor:
    """Mean over every dimension but the batch."""
    return x.mean(dim=tuple(range(1, x.ndim)))


def normal_kl(mean1: Tensor, logvar1: Tensor, mean2: Tensor, logvar2: Tensor) -> Tensor:
    """KL(N(mean1, e^logvar1) ‖ N(mean2, e^logvar2)) elementwise, in nats."""
    return 0.5 * (
        -1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2)
    )


def discretized_gaussian_log_likelihood(x: Tensor, means: Tensor, log_scales: Tensor) -> Tensor:
    """log P(x) of 8-bit data in [-1, 1] under N(means, e^{2 log_scales}) integrated over x's bin.

    The edge bins extend to ±∞ (Ho et al. 2020, eq. 13), so the decoder is a proper distribution.
    """
    half_bin = 1.0 / 255.0
    inv_std = torch.exp(-log_scales)
    upper = inv_std * (x - means + half_bin)
    lower = inv_std * (x - means - half_bin)
    log_cdf_upper = torch.special.log_ndtr(upper)
    log_sf_lower = torch.special.log_ndtr(-lower)
    log_bin = torch.log((torch.special.ndtr(upper) - torch.special.ndtr(lower)).clamp(min=1e-12))
    return torch.where(x < -0.999, log_cdf_upper, torch.where(x > 0.999, log_sf_lower, log_bin))


class GaussianDiffusion:
    """The forward process q, its posterior, the model's reverse step p_θ and the training loss."""

    def __init__(
        self,
        betas: Tensor | Sequence[float],
        learn_sigma: bool = True,
        loss: str = "hybrid",
        lambda_vlb: float = 0.001,
        timestep_map: Tensor | Sequence[int] | None = None,
        prediction: str = "eps",
        weighting: str = "eps",
        min_snr_gamma: float = 5.0,
    ) -> None:
        b = torch.as_tensor(betas, dtype=torch.float64).detach().cpu().flatten()
        if b.numel() < 1:
            raise ValueError("betas must hold at least one step")
        if not bool(((b > 0) & (b < 1)).all()):
            raise ValueError(
                f"betas must lie in (0, 1), got min {b.min().item():.3g} max {b.max().item():.3g} "
                "(the linear schedule needs T > 20)"
            )
        if loss not in LOSSES:
            raise ValueError(f"unknown loss {loss!r}; expected one of {LOSSES}")
        if loss == "hybrid" and not learn_sigma:
            raise ValueError("the hybrid loss needs learn_sigma=True (L_vlb only trains the variance)")
        if lambda_vlb < 0:
            raise ValueError(f"lambda_vlb must be ≥ 0, got {lambda_vlb}")
        if prediction not in PREDICTIONS:
            raise ValueError(f"unknown prediction {prediction!r}; expected one of {PREDICTIONS}")
        if weighting not in WEIGHTINGS:
            raise ValueError(f"unknown weighting {weighting!r}; expected one of {WEIGHTINGS}")
        if not min_snr_gamma > 0:
            raise ValueError(f"min_snr_gamma must be > 0, got {min_snr_gamma}")
        self.prediction = prediction
        self.weighting = weighting
        self.min_snr_gamma = float(min_snr_gamma)
        self.betas = b
        self.learn_sigma = bool(learn_sigma)
        self.loss = loss
        self.lambda_vlb = float(lambda_vlb)
        self.num_timesteps = T = b.numel()
        tmap = torch.arange(T) if timestep_map is None else torch.as_tensor(timestep_map).long().cpu()
        if tmap.shape != (T,):
            raise ValueError(f"timestep_map has {tmap.numel()} entries for {T} steps")
        self.timestep_map = tmap

        self.alphas = alphas = 1.0 - b
        self.alphas_cumprod = ab = torch.cumprod(alphas, dim=0)
        self.alphas_cumprod_prev = ab_prev = torch.cat([torch.ones(1, dtype=torch.float64), ab[:-1]])
        self.sqrt_alphas_cumprod = ab.sqrt()
        self.sqrt_one_minus_alphas_cumprod = (1.0 - ab).sqrt()
        self.sqrt_recip_alphas_cumprod = (1.0 / ab).sqrt()
        self.sqrt_recipm1_alphas_cumprod = (1.0 / ab - 1.0).sqrt()
        # β̃_t of q(x_{t-1} | x_t, x_0) (Ho et al. eq. 7).
        self.posterior_variance = b * (1.0 - ab_prev) / (1.0 - ab)
        # β̃_0 = 0: its log is clipped to log β̃_1 so the learned interpolation stays finite.
        first = self.posterior_variance[1:2] if T > 1 else b[:1]
        self.posterior_log_variance_clipped = torch.log(torch.cat([first, self.posterior_variance[1:]]))
        self.posterior_mean_coef1 = b * ab_prev.sqrt() / (1.0 - ab)
        self.posterior_mean_coef2 = (1.0 - ab_prev) * alphas.sqrt() / (1.0 - ab)
        self.mse_weights = self._mse_weights(ab / (1.0 - ab))

    def _mse_weights(self, snr: Tensor) -> Tensor:
        """Per-step weight of ‖target − output‖² that makes L_simple `w(SNR)·‖x_0 − x̂_0‖²`.

        ‖ε − ε̂‖² = SNR·‖x_0 − x̂_0‖² and ‖v − v̂‖² = (SNR + 1)·‖x_0 − x̂_0‖², so each weighting
        is divided by the native target's own factor.
        """
        x0_weight = {"eps": snr, "v": snr + 1.0, "min-snr": snr.clamp(max=self.min_snr_gamma)}[self.weighting]
        return x0_weight / (snr if self.prediction == "eps" else snr + 1.0)

    @classmethod
    def from_config(cls, cfg: DiffusionConfig) -> GaussianDiffusion:
        cfg.validate()
        return cls(
            get_named_beta_schedule(cfg.noise_schedule, cfg.steps),
            learn_sigma=cfg.learn_sigma,
            loss=cfg.loss,
            lambda_vlb=cfg.lambda_vlb,
            prediction=cfg.prediction,
            weighting=cfg.weighting,
            min_snr_gamma=cfg.min_snr_gamma,
        )

    def __repr__(self) -> str:
        return (
            f"GaussianDiffusion(T={self.num_timesteps}, learn_sigma={self.learn_sigma}, "
            f"loss={self.loss!r}, lambda_vlb={self.lambda_vlb}, prediction={self.prediction!r}, "
            f"weighting={self.weighting!r})"
        )

    # ------------------------------------------------------------------ respacing
    def respace(self, use_timesteps: Sequence[int] | Tensor) -> GaussianDiffusion:
        """A diffusion over a subset of steps with the same ᾱ there (Nichol & Dhariwal §4).

        β'_i = 1 − ᾱ_{t_i}/ᾱ_{t_{i-1}}; `timestep_map[i]` is the original t the network saw.
        """
        use = sorted({int(t) for t in torch.as_tensor(use_timesteps).flatten().tolist()})
        if not use:
            raise ValueError("respace needs at least one timestep")
        if use[0] < 0 or use[-1] >= self.num_timesteps:
            raise ValueError(f"respaced timesteps must lie in 0..{self.num_timesteps - 1}")
        idx = torch.tensor(use)
        ab = self.alphas_cumprod[idx]
        ab_prev = torch.cat([torch.ones(1, dtype=torch.float64), ab[:-1]])
        return GaussianDiffusion(
            1.0 - ab / ab_prev,
            learn_sigma=self.learn_sigma,
            loss=self.loss,
            lambda_vlb=self.lambda_vlb,
            timestep_map=self.timestep_map[idx],
            prediction=self.prediction,
            weighting=self.weighting,
            min_snr_gamma=self.min_snr_gamma,
        )

    # ------------------------------------------------------------------ q
    def q_sample(self, x_start: Tensor, t: Tensor, noise: Tensor | None = None) -> Tensor:
        """x_t = √ᾱ_t x_0 + √(1−ᾱ_t) ε (Ho et al. eq. 4)."""
        if noise is None:
            noise = torch.randn_like(x_start)
        if noise.shape != x_start.shape:
            raise ValueError(f"noise shape {tuple(noise.shape)} != x_start shape {tuple(x_start.shape)}")
        shape, dt = x_start.shape, x_start.dtype
        return (
            _extract(self.sqrt_alphas_cumprod, t, shape, dt) * x_start
            + _extract(self.sqrt_one_minus_alphas_cumprod, t, shape, dt) * noise
        )

    def q_posterior_mean_variance(
        self, x_start: Tensor, x_t: Tensor, t: Tensor
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Mean, variance β̃_t and clipped log-variance of q(x_{t-1} | x_t, x_0) (Ho et al. eq. 6–7)."""
        shape, dt = x_t.shape, x_t.dtype
        mean = (
            _extract(self.posterior_mean_coef1, t, shape, dt) * x_start
            + _extract(self.posterior_mean_coef2, t, shape, dt) * x_t
        )
        var = _extract(self.posterior_variance, t, shape, dt).expand_as(x_t)
        logvar = _extract(self.posterior_log_variance_clipped, t, shape, dt).expand_as(x_t)
        return mean, var, logvar

    # ------------------------------------------------------------------ p
    def split_model_output(self, model_output: Tensor, x_t: Tensor) -> tuple[Tensor, Tensor | None]:
        """The network output → (mean output: ε̂ or v̂, variance output u) with u None when σ is fixed."""
        c = x_t.shape[1]
        expected = 2 * c if self.learn_sigma else c
        if model_output.shape[0] != x_t.shape[0] or model_output.shape[1] != expected:
            raise ValueError(
                f"model output has shape {tuple(model_output.shape)}, expected {expected} channels "
                f"for x_t {tuple(x_t.shape)} (learn_sigma={self.learn_sigma})"
            )
        if self.learn_sigma:
            mean_out, u = model_output.split(c, dim=1)
            return mean_out, u
        return model_output, None

    def velocity(self, x_start: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        """v = √ᾱ_t ε − √(1−ᾱ_t) x_0, the v-prediction target."""
        shape, dt = x_start.shape, x_start.dtype
        return (
            _extract(self.sqrt_alphas_cumprod, t, shape, dt) * noise
            - _extract(self.sqrt_one_minus_alphas_cumprod, t, shape, dt) * x_start
        )

    def predict_xstart_and_eps(self, model_output: Tensor, x_t: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        """(x̂_0, ε̂) from the raw network output, whichever quantity the network predicts."""
        mean_out, _ = self.split_model_output(model_output, x_t)
        if self.prediction == "eps":
            return self.predict_xstart_from_eps(x_t, t, mean_out), mean_out
        shape, dt = x_t.shape, x_t.dtype
        alpha = _extract(self.sqrt_alphas_cumprod, t, shape, dt)
        sigma = _extract(self.sqrt_one_minus_alphas_cumprod, t, shape, dt)
        return alpha * x_t - sigma * mean_out, sigma * x_t + alpha * mean_out

    def predict_xstart_from_eps(self, x_t: Tensor, t: Tensor, eps: Tensor) -> Tensor:
        """x̂_0 = (x_t − √(1−ᾱ_t) ε̂)/√ᾱ_t."""
        shape, dt = x_t.shape, x_t.dtype
        return (
            _extract(self.sqrt_recip_alphas_cumprod, t, shape, dt) * x_t
            - _extract(self.sqrt_recipm1_alphas_cumprod, t, shape, dt) * eps
        )

    def predict_eps_from_xstart(self, x_t: Tensor, t: Tensor, pred_xstart: Tensor) -> Tensor:
        """ε consistent with x_t and a (possibly clipped) x̂_0: (x_t − √ᾱ_t x̂_0)/√(1−ᾱ_t)."""
        shape, dt = x_t.shape, x_t.dtype
        return (x_t - _extract(self.sqrt_alphas_cumprod, t, shape, dt) * pred_xstart) / _extract(
            self.sqrt_one_minus_alphas_cumprod, t, shape, dt
        )

    def model_log_variance(self, u: Tensor | None, t: Tensor, x_t: Tensor) -> Tensor:
        """log Σ_θ: learned-range exp((u+1)/2 · log β_t + (1 − (u+1)/2) · log β̃_t), else log β̃_t.

        The fixed variance is β̃_t ("fixed small"), which Nichol & Dhariwal found the better
        choice for L_simple models sampled with fewer steps than they were trained with.
        """
        shape, dt = x_t.shape, x_t.dtype
        min_log = _extract(self.posterior_log_variance_clipped, t, shape, dt)
        if u is None:
            return min_log.expand_as(x_t)
        max_log = _extract(torch.log(self.betas), t, shape, dt)
        frac = (u + 1) / 2
        return frac * max_log + (1 - frac) * min_log

    def p_mean_variance(
        self, model_output: Tensor, x_t: Tensor, t: Tensor, *, clip_denoised: bool = True
    ) -> dict[str, Tensor]:
        """p_θ(x_{t-1} | x_t) from the raw network output (ε or v, optional learned variance).

        `t` indexes this diffusion's own (possibly respaced) steps. Returns mean, variance,
        log_variance, pred_xstart (clipped to [-1, 1] when asked) and the predicted eps.
        """
        _, u = self.split_model_output(model_output, x_t)
        log_variance = self.model_log_variance(u, t, x_t)
        pred_xstart, eps = self.predict_xstart_and_eps(model_output, x_t, t)
        if clip_denoised:
            pred_xstart = pred_xstart.clamp(-1.0, 1.0)
        mean, _, _ = self.q_posterior_mean_variance(pred_xstart, x_t, t)
        return {
            "mean": mean,
            "variance": torch.exp(log_variance),
            "log_variance": log_variance,
            "pred_xstart": pred_xstart,
            "eps": eps,
        }

    # ------------------------------------------------------------------ losses
    def vb_terms_bpd(self, model_output: Tensor, x_start: Tensor, x_t: Tensor, t: Tensor) -> Tensor:
        """Per-sample L_t in bits/dim: KL(q(x_{t-1}|x_t,x_0) ‖ p_θ) for t > 0, decoder NLL at t = 0."""
        true_mean, _, true_log_var = self.q_posterior_mean_variance(x_start, x_t, t)
        p = self.p_mean_variance(model_output, x_t, t, clip_denoised=False)
        kl = mean_flat(normal_kl(true_mean, true_log_var, p["mean"], p["log_variance"])) / math.log(2.0)
        nll = -discretized_gaussian_log_likelihood(x_start, p["mean"], 0.5 * p["log_variance"])
        decoder_nll = mean_flat(nll) / math.log(2.0)
        return torch.where(t == 0, decoder_nll, kl)

    def training_losses(
        self, model: ModelFn | Any, x_start: Tensor, t: Tensor, noise: Tensor | None = None
    ) -> dict[str, Tensor]:
        """Per-sample loss, mse = ‖target − output‖² (mean over pixels) and vb = L_t (bits/dim).

        The target is ε or v (`prediction`); L_simple = w_t·mse with the `weighting`'s w_t.
        hybrid: loss = L_simple + λ·T·vb — T·L_t is an unbiased estimate of L_vlb = Σ_t L_t. The
        vb term sees the mean output detached, so it only trains the variance (Nichol & Dhariwal
        §3.1). The model is called as model(x_t, original t).
        """
        if noise is None:
            noise = torch.randn_like(x_start)
        x_t = self.q_sample(x_start, t, noise)
        model_output = model(x_t, self.timestep_map.to(t.device)[t.long()])
        mean_out, u = self.split_model_output(model_output, x_t)
        target = noise if self.prediction == "eps" else self.velocity(x_start, noise, t)
        mse = mean_flat((target - mean_out) ** 2)
        simple = _extract(self.mse_weights, t, (t.shape[0],), mse.dtype) * mse
        frozen = mean_out.detach() if u is None else torch.cat([mean_out.detach(), u], dim=1)
        vb = self.vb_terms_bpd(frozen, x_start, x_t, t)
        loss = simple + self.lambda_vlb * self.num_timesteps * vb if self.loss == "hybrid" else simple
        return {"loss": loss, "mse": mse, "vb": vb}
