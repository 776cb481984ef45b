"""Samplers against the exact optimal denoiser of known per-pixel distributions.

For data x_0 from a Gaussian mixture per pixel, E[x_0 | x_t] and Var[x_0 | x_t] are closed
form, so ε*(x_t, t) = (x_t − √ᾱ_t E[x_0|x_t]) / √(1 − ᾱ_t) is the best possible network and
the variance of q(x_{t-1} | x_t) = β̃_t + c_1² Var[x_0|x_t] gives the best learned v. A correct
sampler driven by it must reproduce the data's mean and standard deviation; the
wrong-coefficient tests show the same check fails when one coefficient is off.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch

from model import samplers as S
from model.diffusion import GaussianDiffusion, get_named_beta_schedule, space_timesteps
from model.seeding import PerSampleNoise

# Tiny tensors: intra-op threads only add sync overhead (40× slower on a busy 2-core box).
pytestmark = pytest.mark.usefixtures("torch_single_thread")

N_SAMPLES = 4000
# Three channels × 2 pixels, each pixel an independent two-component mixture (weights, means, stds):
#   0: Gaussian N(0.1, 0.3²) (two identical components)
#   1: two-point ±0.6, equal weights
#   2: asymmetric 0.3·N(−0.5, 0.1²) + 0.7·N(0.5, 0.1²)
WEIGHTS = torch.tensor([[0.5, 0.5], [0.5, 0.5], [0.3, 0.7]], dtype=torch.float64)
MEANS = torch.tensor([[0.1, 0.1], [-0.6, 0.6], [-0.5, 0.5]], dtype=torch.float64)
STDS = torch.tensor([[0.3, 0.3], [0.0, 0.0], [0.1, 0.1]], dtype=torch.float64)
SHAPE = (3, 1, 2)
TARGET_MEAN = (WEIGHTS * MEANS).sum(-1)
TARGET_STD = ((WEIGHTS * (STDS**2 + MEANS**2)).sum(-1) - TARGET_MEAN**2).sqrt()

# Stated tolerances (8000 draws per channel: the standard error of the std is 0.8 %, of the mean
# ≤ 0.007). Mean: 0.03 (1.5 % of the [-1, 1] range). Std, relative: 5 %, except DDIM(η=0) at 50
# steps, whose discretisation under-disperses narrow data by itself (−8 % here, see
# test_ddim_is_the_exact_affine_map_for_gaussian_data), so 12 %.
MEAN_TOL = 0.03
STD_TOL = {"ddpm": 0.05, "ddim": 0.12, "dpm++": 0.05, "dpm++sde": 0.05}


def _diffusion(learn_sigma: bool = True) -> GaussianDiffusion:
    return GaussianDiffusion(
        get_named_beta_schedule("linear", 1000),
        learn_sigma=learn_sigma,
        loss="hybrid" if learn_sigma else "mse",
    )


class MixtureDenoiser:
    """The exact ε* (and the best learned v) for per-channel two-component Gaussian mixtures."""

    def __init__(self, diffusion: GaussianDiffusion, learn_sigma: bool) -> None:
        self.d = diffusion  # the un-respaced diffusion: the network only knows original t
        self.learn_sigma = learn_sigma
        self.calls: list[torch.Tensor] = []

    def posterior(self, x_t: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """E[x_0 | x_t] and Var[x_0 | x_t] per element (float64)."""
        n, c = x_t.shape[:2]
        ab = self.d.alphas_cumprod[t.cpu()].view(n, 1, 1, 1)
        x = x_t.double().reshape(n, c, -1, 1)
        w, m, s2 = (a.view(1, c, 1, 2) for a in (WEIGHTS, MEANS, STDS**2))
        var_k = ab * s2 + (1 - ab)  # x_t | component k ~ N(√ᾱ m_k, ᾱ s_k² + 1 − ᾱ)
        dev = x - ab.sqrt() * m
        logit = w.log() - 0.5 * var_k.log() - 0.5 * dev**2 / var_k
        # Clamped two-way softmax: keeps responsibilities away from float64 denormals (slow on CPU).
        r1 = torch.sigmoid((logit[..., 1] - logit[..., 0]).clamp(-600, 600)).unsqueeze(-1)
        r = torch.cat([1 - r1, r1], dim=-1)
        m_post = m + ab.sqrt() * s2 / var_k * dev
        v_post = s2 * (1 - ab) / var_k
        e = (r * m_post).sum(-1)
        var = ((r * (v_post + m_post**2)).sum(-1) - e**2).clamp(min=0)
        return e.view(x_t.shape), var.view(x_t.shape)

    def __call__(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        self.calls.append(t.clone())
        e, var = self.posterior(x_t, t)
        n = x_t.shape[0]
        ab = self.d.alphas_cumprod[t.cpu()].view(n, 1, 1, 1)
        eps = (x_t.double() - ab.sqrt() * e) / (1 - ab).sqrt()
        if not self.learn_sigma:
            return eps
        d, tc = self.d, t.cpu()
        lo = d.posterior_log_variance_clipped[tc].view(n, 1, 1, 1)
        hi = d.betas[tc].log().view(n, 1, 1, 1)
        best = (
            d.posterior_variance[tc].view(n, 1, 1, 1) + d.posterior_mean_coef1[tc].view(n, 1, 1, 1) ** 2 * var
        )
        v = 2 * (best.clamp(min=1e-300).log() - lo) / (hi - lo) - 1
        return torch.cat([eps, v.clamp(-1, 1)], dim=1)  # float64 on purpose: samplers cast


def _torch_noise(seed: int) -> Callable[[torch.Tensor], torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return lambda x: torch.randn(x.shape, generator=g)


def _run(sampler: str, steps: int, learn_sigma: bool = True, **kw: object) -> torch.Tensor:
    d = _diffusion(learn_sigma)
    x_T = torch.randn(N_SAMPLES, *SHAPE, generator=torch.Generator().manual_seed(0))
    return S.SAMPLERS[sampler](
        MixtureDenoiser(d, learn_sigma), d, x_T, steps=steps, noise=_torch_noise(1), **kw
    )


def moment_errors(x: torch.Tensor, std_tol: float) -> list[str]:
    """Violations of the stated tolerances, one line per channel and moment (empty = pass)."""
    assert x.dtype == torch.float32 and torch.isfinite(x).all()
    per_channel = x.transpose(0, 1).reshape(x.shape[1], -1).double()
    bad = []
    for c, (mean, std) in enumerate(zip(per_channel.mean(1), per_channel.std(1), strict=True)):
        dm = mean.item() - TARGET_MEAN[c].item()
        ds = std.item() / TARGET_STD[c].item() - 1
        if abs(dm) > MEAN_TOL:
            bad.append(f"channel {c}: mean off by {dm:+.4f}")
        if abs(ds) > std_tol:
            bad.append(f"channel {c}: std off by {100 * ds:+.1f} %")
    return bad


# ---------------------------------------------------------------------------- correctness
@pytest.mark.parametrize(
    ("sampler", "steps", "learn_sigma", "kw"),
    [
        ("ddpm", 1000, True, {}),
        ("ddpm", 250, True, {}),
        ("ddpm", 250, False, {}),
        ("ddim", 50, True, {"eta": 0.0}),
        ("dpm++", 20, True, {}),
        ("dpm++sde", 20, True, {}),
        ("dpm++sde", 50, True, {}),
    ],
    ids=["ddpm1000-learned", "ddpm250-learned", "ddpm250-fixed", "ddim50", "dpm++20", "dpm++sde20",
         "dpm++sde50"],
)
def test_sampler_reproduces_data_moments(sampler: str, steps: int, learn_sigma: bool, kw: dict) -> None:
    x = _run(sampler, steps, learn_sigma, **kw)
    assert moment_errors(x, STD_TOL[sampler]) == []
    # The two-point channel must land on its two atoms, in equal shares.
    atoms = x[:, 1].flatten()
    assert (atoms.abs() - 0.6).abs().max().item() < 0.02
    assert abs((atoms > 0).float().mean().item() - 0.5) < 0.03


# The correct functions, kept before any monkeypatching so the wrong variants can reuse them.
_CORRECT_DDIM = S.ddim_coefficients
_CORRECT_DPMPP = S.dpmpp_2m_step


def _ddpm_noise_too_large(
    mean: torch.Tensor, log_variance: torch.Tensor, z: torch.Tensor | None
) -> torch.Tensor:
    return mean if z is None else mean + 1.1 * torch.exp(0.5 * log_variance) * z


def _ddpm_variance_for_std(
    mean: torch.Tensor, log_variance: torch.Tensor, z: torch.Tensor | None
) -> torch.Tensor:
    return mean if z is None else mean + torch.exp(log_variance) * z


def _ddim_x0_without_sqrt(ab: float, ab_prev: float, eta: float) -> tuple[float, float, float]:
    _, c_eps, sigma = _CORRECT_DDIM(ab, ab_prev, eta)
    return ab_prev, c_eps, sigma


def _dpmpp_weight_1_over_r(
    x: torch.Tensor,
    x0: torch.Tensor,
    x0_prev: torch.Tensor | None,
    *,
    sigma: float,
    sigma_next: float,
    alpha_next: float,
    h: float,
    h_prev: float | None,
) -> torch.Tensor:
    d = x0 if x0_prev is None or h_prev is None else (1 + h / h_prev) * x0 - (h / h_prev) * x0_prev
    return (sigma_next / sigma) * x - alpha_next * math.expm1(-h) * d


def _dpmpp_first_order_only(
    x: torch.Tensor,
    x0: torch.Tensor,
    x0_prev: torch.Tensor | None,
    *,
    sigma: float,
    sigma_next: float,
    alpha_next: float,
    h: float,
    h_prev: float | None,
) -> torch.Tensor:
    return _CORRECT_DPMPP(
        x, x0, None, sigma=sigma, sigma_next=sigma_next, alpha_next=alpha_next, h=h, h_prev=None
    )


@pytest.mark.parametrize(
    ("sampler", "steps", "target", "wrong"),
    [
        ("ddpm", 250, "ddpm_step", _ddpm_noise_too_large),
        ("ddpm", 250, "ddpm_step", _ddpm_variance_for_std),
        ("ddim", 50, "ddim_coefficients", _ddim_x0_without_sqrt),
        ("dpm++", 20, "dpmpp_2m_step", _dpmpp_weight_1_over_r),
        ("dpm++", 20, "dpmpp_2m_step", _dpmpp_first_order_only),
    ],
    ids=["ddpm-noise×1.1", "ddpm-σ²-for-σ", "ddim-ᾱ-for-√ᾱ", "dpm++-1/r-for-1/2r", "dpm++-no-2nd-order"],
)
def test_moment_check_fails_with_a_wrong_coefficient(
    monkeypatch: pytest.MonkeyPatch, sampler: str, steps: int, target: str, wrong: Callable
) -> None:
    monkeypatch.setattr(S, target, wrong)
    assert moment_errors(_run(sampler, steps), STD_TOL[sampler]) != []


def _ddim_gap_to_exact_affine_map() -> tuple[float, float]:
    """(max |DDIM(η=0) − closed form| on the Gaussian channel, the map's gain over the data std).

    For Gaussian data E[x_0|x_t] is affine in x_t, so each DDIM step is too: compose them.
    """
    d = _diffusion()
    x_T = torch.randn(64, *SHAPE, generator=torch.Generator().manual_seed(5))
    x0 = S.sample_ddim(MixtureDenoiser(d, True), d, x_T, steps=50, noise=_torch_noise(0))
    mu, s2 = MEANS[0, 0].item(), STDS[0, 0].item() ** 2
    ab = d.alphas_cumprod[space_timesteps(1000, 50)].tolist()
    a, b = 1.0, 0.0  # x = a·x_T + b
    for i in reversed(range(50)):
        at, ap = ab[i], (ab[i - 1] if i > 0 else 1.0)
        gain = math.sqrt(at) * s2 / (at * s2 + 1 - at)  # E[x0|x] = mu + gain (x − √ᾱ mu)
        e_a, e_b = gain * a, mu + gain * (b - math.sqrt(at) * mu)
        eps_a = (a - math.sqrt(at) * e_a) / math.sqrt(1 - at)
        eps_b = (b - math.sqrt(at) * e_b) / math.sqrt(1 - at)
        a = math.sqrt(ap) * e_a + math.sqrt(1 - ap) * eps_a
        b = math.sqrt(ap) * e_b + math.sqrt(1 - ap) * eps_b
    expected = a * x_T[:, 0].double() + b
    return (x0[:, 0].double() - expected).abs().max().item(), a / math.sqrt(s2)


def test_ddim_is_the_exact_affine_map_for_gaussian_data() -> None:
    gap, gain = _ddim_gap_to_exact_affine_map()
    assert gap < 2e-5
    assert 0.90 < gain < 0.93  # the −8 % under-dispersion DDIM-50 shows in the moment test


def test_ddim_affine_check_catches_a_one_percent_coefficient_error(monkeypatch: pytest.MonkeyPatch) -> None:
    def c_eps_one_percent_high(ab: float, ab_prev: float, eta: float) -> tuple[float, float, float]:
        c_x0, c_eps, sigma = _CORRECT_DDIM(ab, ab_prev, eta)
        return c_x0, 1.01 * c_eps, sigma

    monkeypatch.setattr(S, "ddim_coefficients", c_eps_one_percent_high)
    gap, _ = _ddim_gap_to_exact_affine_map()
    assert gap > 1e-3


def test_ddim_eta_one_equals_ancestral_with_posterior_variance() -> None:
    """DDIM with η = 1 is DDPM with σ² = β̃_t (Song et al. §4.1): same noise, same samples."""
    d = _diffusion(learn_sigma=False)
    x_T = torch.randn(256, *SHAPE, generator=torch.Generator().manual_seed(2))
    oracle = MixtureDenoiser(d, learn_sigma=False)
    a = S.sample_ddim(oracle, d, x_T, steps=25, noise=_torch_noise(3), eta=1.0)
    b = S.sample_ddpm(oracle, d, x_T, steps=25, noise=_torch_noise(3))
    torch.testing.assert_close(a, b, rtol=0, atol=1e-4)


def test_dpmpp_logsnr_spacing() -> None:
    d = _diffusion()
    ts = S.dpmpp_timesteps(d, 20)
    assert len(set(ts)) == 20 and ts == sorted(ts) and ts[0] == 0 and ts[-1] == 999
    lam = S.log_snr(d.alphas_cumprod[ts])
    h = -lam.diff()
    # Near-equal λ steps (only t = 0, 1 are closer: λ jumps between integer t there), so r ≈ 1 in
    # the 2M update. Uniform-t spacing ends with one step 11× longer in λ than its predecessor:
    # r ≈ 0.2 inflates the extrapolation weight 1/(2r), which costs it +29 % std at 20 steps.
    assert (h.max() / h.min()).item() < 1.5 and (h[3:].max() / h[3:].min()).item() < 1.1
    uniform = S.dpmpp_timesteps(d, 20, "uniform")
    assert uniform == space_timesteps(1000, 20)
    h_uniform = -S.log_snr(d.alphas_cumprod[uniform]).diff()
    assert (h_uniform.max() / h_uniform.min()).item() > 5
    many = S.dpmpp_timesteps(d, 600)  # rounding collisions near t = 0 are pushed apart
    assert len(set(many)) == 600 and many[0] == 0 and many[-1] == 999
    with pytest.raises(ValueError, match="unknown time spacing"):
        S.dpmpp_timesteps(d, 20, "karras")


# ---------------------------------------------------------------------------- the contract
@pytest.mark.parametrize("name", list(S.SAMPLERS))
def test_model_sees_original_timesteps_and_progress_counts(name: str) -> None:
    d = _diffusion()
    oracle = MixtureDenoiser(d, True)
    seen: list[tuple[int, int]] = []
    x = S.SAMPLERS[name](
        oracle,
        d,
        torch.zeros(2, *SHAPE),
        steps=10,
        noise=_torch_noise(0),
        progress=lambda a, b: seen.append((a, b)),
    )
    assert x.shape == (2, *SHAPE)
    assert seen == [(k, 10) for k in range(1, 11)]
    ts = [t.tolist() for t in oracle.calls]
    assert all(t[0] == t[1] for t in ts) and oracle.calls[0].dtype == torch.long
    expected = S.dpmpp_timesteps(d, 10) if name.startswith("dpm++") else space_timesteps(1000, 10)
    assert [t[0] for t in ts] == expected[::-1]


@pytest.mark.parametrize("name", list(S.SAMPLERS))
def test_should_stop_cancels_between_steps(name: str) -> None:
    d = _diffusion()
    oracle = MixtureDenoiser(d, True)
    checks = iter([False, False, False, True])
    with pytest.raises(S.SamplingCancelled, match="after 3 of 10 steps"):
        S.SAMPLERS[name](
            oracle,
            d,
            torch.zeros(2, *SHAPE),
            steps=10,
            noise=_torch_noise(0),
            should_stop=lambda: next(checks),
        )
    assert len(oracle.calls) == 3


def test_defaults_registry_and_bad_steps() -> None:
    assert set(S.SAMPLERS) == set(S.DEFAULT_STEPS) == {"ddpm", "ddim", "dpm++", "dpm++sde"}
    assert S.DEFAULT_STEPS == {"ddpm": 1000, "ddim": 50, "dpm++": 20, "dpm++sde": 20}
    d = _diffusion()
    for name, fn in S.SAMPLERS.items():
        with pytest.raises(ValueError, match="between 1 and 1000"):
            fn(
                MixtureDenoiser(d, True),
                d,
                torch.zeros(1, *SHAPE),
                steps=1001 if name != "ddim" else 0,
                noise=_torch_noise(0),
            )


def test_low_precision_model_output_is_computed_in_float32() -> None:
    d = _diffusion()
    oracle = MixtureDenoiser(d, True)
    x = S.sample_dpmpp_2m(
        lambda x, t: oracle(x, t).to(torch.bfloat16),
        d,
        torch.randn(8, *SHAPE),
        steps=5,
        noise=_torch_noise(0),
    )
    assert x.dtype == torch.float32 and torch.isfinite(x).all()


@pytest.mark.parametrize(
    ("name", "kw"), [("ddpm", {}), ("ddim", {"eta": 0.5}), ("dpm++", {}), ("dpm++sde", {})]
)
def test_per_sample_noise_makes_samples_independent_of_the_batch(name: str, kw: dict) -> None:
    d = _diffusion()
    oracle = MixtureDenoiser(d, True)

    def sample(seed: int, indices: list[int]) -> torch.Tensor:
        noise = PerSampleNoise(seed, indices)
        x_T = noise.randn(SHAPE)
        return S.SAMPLERS[name](oracle, d, x_T, steps=20, noise=noise.randn_like, **kw)

    a = sample(7, [0, 1, 2, 3])
    assert torch.equal(a, sample(7, [0, 1, 2, 3]))  # same request → bit-identical
    b = sample(7, [3, 8])
    assert torch.equal(a[3], b[0])  # sample 3 does not depend on its neighbours
    assert not torch.equal(a[3], sample(8, [3])[0])  # another seed is another sample
    assert not torch.equal(a[0], a[1])


# ---------------------------------------------------------------------------- v-prediction and cosine
def test_cosine_logsnr_grid_starts_where_the_schedule_is_smooth() -> None:
    """The clipped last β made λ jump −6.46 → −9.92; a grid from −9.92 put 9 of 20 steps on t ≥ 991."""
    d = GaussianDiffusion(get_named_beta_schedule("cosine", 1000), learn_sigma=False, loss="mse")
    assert S.smooth_end(d) == 998
    ts = S.dpmpp_timesteps(d, 20)
    assert ts[0] == 0 and ts[-1] == 999 and len(set(ts)) == 20
    assert sum(t >= 991 for t in ts) <= 4
    h = -S.log_snr(d.alphas_cumprod[ts]).diff()
    # Every step but the first (which crosses the clipped jump) is near-uniform in λ, up to the
    # rounding to integer t where λ is steep (near t = 0 and t = T).
    assert (h[3:-3].max() / h[3:-3].min()).item() < 1.15 and h[:-1].max().item() < 0.75
    assert h[-1].item() > 3  # the first step: λ(999) = −9.92 → about −6
    linear = _diffusion()
    assert S.smooth_end(linear) == 999


@pytest.mark.parametrize(("name", "steps"), [("ddpm", 50), ("ddim", 20), ("dpm++", 10), ("dpm++sde", 10)])
def test_v_prediction_samples_equal_eps_prediction_samples(name: str, steps: int) -> None:
    """The same exact denoiser, once as ε and once as v: every sampler gives the same slices."""
    from tests.exact_denoiser import SliceSetDenoiser

    slices = torch.rand(4, 2, 6, 6, generator=torch.Generator().manual_seed(1)) * 2 - 1
    x_T = torch.randn(3, 2, 6, 6, generator=torch.Generator().manual_seed(2))
    out = {}
    for prediction in ("eps", "v"):
        d = GaussianDiffusion(get_named_beta_schedule("cosine", 1000), learn_sigma=True, loss="hybrid",
                              prediction=prediction)
        out[prediction] = S.SAMPLERS[name](SliceSetDenoiser(d, slices), d, x_T, steps=steps,
                                           noise=_torch_noise(3))
    torch.testing.assert_close(out["v"], out["eps"], rtol=0, atol=2e-4)
    # and they are the known slices: each sample is within 0.05 of one of them
    nearest = torch.cdist(out["v"].flatten(1), slices.flatten(1)).min(dim=1).values / 6
    assert nearest.max().item() < 0.05


# ---------------------------------------------------------------------------- grad context
def _plain_tiny_unet() -> tuple[torch.nn.Module, GaussianDiffusion]:
    """A `tiny` UNetModel as a plain nn.Module (parameters require grad), output head not zero."""
    from model.config import get_preset
    from model.unet import UNetModel

    preset = get_preset("tiny")
    torch.manual_seed(0)
    net = UNetModel(preset.model).eval()
    with torch.no_grad():
        for p in net.parameters():
            if p.ndim > 1 and not p.any():
                p.copy_(torch.randn_like(p) * 0.05)
    return net, GaussianDiffusion.from_config(preset.diffusion)


@pytest.mark.parametrize(
    ("name", "kw"), [("ddpm", {}), ("ddim", {"eta": 0.5}), ("dpm++", {}), ("dpm++sde", {})]
)
def test_samplers_keep_no_graph_and_ignore_the_callers_grad_context(name: str, kw: dict) -> None:
    """A plain nn.Module keeps no autograd graph, and the UNet's inference-only kernels (chosen by
    grad state) run whether or not the caller opened a no-grad context: bit-identical results."""
    net, d = _plain_tiny_unet()
    x_T = torch.randn(3, net.cfg.in_channels, 32, 32, generator=torch.Generator().manual_seed(1))

    def run() -> torch.Tensor:
        return S.SAMPLERS[name](net, d, x_T, steps=3, noise=_torch_noise(2), **kw)

    plain = run()
    with torch.no_grad():
        no_grad = run()
    with torch.inference_mode():
        inference = run()
    assert not plain.requires_grad and plain.grad_fn is None
    assert torch.equal(plain, no_grad) and torch.equal(plain, inference)
