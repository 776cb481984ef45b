"""Gaussian diffusion: schedules, q, posterior, respacing, p and the hybrid loss, against closed forms."""

from __future__ import annotations

import math

import pytest
import torch

from model.config import DiffusionConfig
from model.diffusion import (
    GaussianDiffusion,
    _extract,
    get_named_beta_schedule,
    space_timesteps,
)

pytestmark = pytest.mark.usefixtures("torch_single_thread")


def _t(values: list[int] | int, n: int | None = None) -> torch.Tensor:
    if isinstance(values, int):
        return torch.full((n or 1,), values, dtype=torch.long)
    return torch.tensor(values, dtype=torch.long)


# ---------------------------------------------------------------------------- schedules
def test_linear_schedule_endpoints_scale_with_T() -> None:
    b = get_named_beta_schedule("linear", 1000)
    assert b.dtype == torch.float64 and b.shape == (1000,)
    assert b[0].item() == pytest.approx(1e-4) and b[-1].item() == pytest.approx(0.02)
    b250 = get_named_beta_schedule("linear", 250)
    assert b250[0].item() == pytest.approx(4e-4) and b250[-1].item() == pytest.approx(0.08)
    assert bool((b.diff() > 0).all())


def test_cosine_schedule_matches_nichol_dhariwal_formula() -> None:
    T = 1000
    d = GaussianDiffusion(get_named_beta_schedule("cosine", T), learn_sigma=False, loss="mse")

    def f(t: float) -> float:
        return math.cos((t / T + 0.008) / 1.008 * math.pi / 2) ** 2

    # β index i is the paper's step t = i + 1, so ᾱ[i] = f(i + 1)/f(0) until the β clip bites.
    for i in (0, 9, 249, 499, 749, 989):
        assert d.alphas_cumprod[i].item() == pytest.approx(f(i + 1) / f(0), rel=1e-9)
    assert d.betas.max().item() == pytest.approx(0.999)  # clipped at t = T
    assert d.betas[0].item() == pytest.approx(1 - f(1) / f(0))


@pytest.mark.parametrize("name", ["linear", "cosine"])
def test_alphas_cumprod_monotone_in_unit_interval(name: str) -> None:
    d = GaussianDiffusion(get_named_beta_schedule(name, 1000), learn_sigma=False, loss="mse")
    ab = d.alphas_cumprod
    assert bool((ab.diff() < 0).all()) and 0 < ab[-1].item() < 1e-3 and ab[0].item() > 0.999


def test_bad_schedule_inputs_raise_one_line_errors() -> None:
    with pytest.raises(ValueError, match="unknown beta schedule"):
        get_named_beta_schedule("quadratic", 100)
    with pytest.raises(ValueError, match=r"betas must lie in \(0, 1\)"):
        GaussianDiffusion(get_named_beta_schedule("linear", 10))
    with pytest.raises(ValueError, match="hybrid loss needs learn_sigma"):
        GaussianDiffusion(get_named_beta_schedule("linear", 100), learn_sigma=False, loss="hybrid")


def test_space_timesteps_even_and_ddim_styles() -> None:
    s = space_timesteps(1000, 250)
    assert len(s) == 250 and s[0] == 0 and s[-1] == 999
    assert set(torch.tensor(s).diff().tolist()) <= {4, 5}
    assert space_timesteps(10, 10) == list(range(10))
    assert space_timesteps(1000, "ddim50") == list(range(0, 1000, 20))
    assert space_timesteps(1000, "20") == space_timesteps(1000, 20)
    for k in range(1, 40):
        s = space_timesteps(40, k)
        assert len(set(s)) == k and s[-1] == 39
    with pytest.raises(ValueError, match="1 ≤ steps ≤ 1000"):
        space_timesteps(1000, 1001)
    with pytest.raises(ValueError, match="bad timestep spacing"):
        space_timesteps(1000, "fast")


def test_from_config_uses_schedule_and_loss() -> None:
    d = GaussianDiffusion.from_config(DiffusionConfig(steps=500, noise_schedule="cosine"))
    assert d.num_timesteps == 500 and d.learn_sigma and d.loss == "hybrid" and d.lambda_vlb == 0.001
    torch.testing.assert_close(d.betas, get_named_beta_schedule("cosine", 500))


def test_extract_broadcasts_per_sample() -> None:
    arr = torch.arange(10, dtype=torch.float64)
    out = _extract(arr, _t([3, 7]), (2, 3, 4, 4))
    assert out.shape == (2, 1, 1, 1) and out.dtype == torch.float32
    assert out.flatten().tolist() == [3.0, 7.0]


# ---------------------------------------------------------------------------- q and posterior
def test_q_sample_moments() -> None:
    d = GaussianDiffusion.from_config(DiffusionConfig())
    g = torch.Generator().manual_seed(0)
    n, t = 200_000, 300
    x0 = torch.full((n, 1, 1, 1), 0.5)
    xt = d.q_sample(x0, _t(t, n), torch.randn(x0.shape, generator=g))
    ab = d.alphas_cumprod[t].item()
    assert xt.mean().item() == pytest.approx(math.sqrt(ab) * 0.5, abs=4 * math.sqrt((1 - ab) / n))
    assert xt.var().item() == pytest.approx(1 - ab, rel=0.015)


def test_posterior_matches_bayes_rule() -> None:
    """q(x_{t-1}|x_t,x_0) ∝ N(x_{t-1}; √ᾱ_{t-1}x_0, 1−ᾱ_{t-1}) · N(x_t; √α_t x_{t-1}, β_t)."""
    d = GaussianDiffusion.from_config(DiffusionConfig())
    t = _t([1, 10, 500, 999])
    x0 = torch.tensor([0.3, -0.7, 0.9, 0.1], dtype=torch.float64).view(4, 1)
    xt = torch.tensor([0.2, 0.5, -1.3, 2.0], dtype=torch.float64).view(4, 1)
    mean, var, logvar = d.q_posterior_mean_variance(x0, xt, t)
    for k, tk in enumerate(t.tolist()):
        ab_prev, alpha, beta = d.alphas_cumprod[tk - 1].item(), d.alphas[tk].item(), d.betas[tk].item()
        precision = 1 / (1 - ab_prev) + alpha / beta
        m = math.sqrt(ab_prev) * x0[k].item() / (1 - ab_prev) + math.sqrt(alpha) * xt[k].item() / beta
        assert var[k].item() == pytest.approx(1 / precision, rel=1e-9)
        assert mean[k].item() == pytest.approx(m / precision, rel=1e-9)
        assert logvar[k].item() == pytest.approx(math.log(1 / precision), rel=1e-9)
    # t = 0: β̃_0 = 0 and the mean is x_0 itself; the log-variance is clipped to log β̃_1.
    mean0, var0, logvar0 = d.q_posterior_mean_variance(x0[:1], xt[:1], _t([0]))
    assert var0.item() == 0.0 and mean0.item() == pytest.approx(x0[0].item())
    assert logvar0.item() == pytest.approx(math.log(d.posterior_variance[1].item()))


# ---------------------------------------------------------------------------- respacing
def test_respace_keeps_alphas_cumprod_and_maps_timesteps() -> None:
    d = GaussianDiffusion.from_config(DiffusionConfig())
    use = space_timesteps(1000, 50)
    r = d.respace(use)
    assert r.num_timesteps == 50 and r.timestep_map.tolist() == use
    torch.testing.assert_close(r.alphas_cumprod, d.alphas_cumprod[use], rtol=1e-12, atol=0)
    assert r.learn_sigma == d.learn_sigma and r.loss == d.loss
    # Respacing a respaced diffusion composes the maps.
    rr = r.respace([0, 10, 49])
    assert rr.timestep_map.tolist() == [use[0], use[10], use[49]]
    torch.testing.assert_close(rr.alphas_cumprod, d.alphas_cumprod[rr.timestep_map], rtol=1e-12, atol=0)
    # The identity respacing changes nothing.
    torch.testing.assert_close(d.respace(range(1000)).betas, d.betas, rtol=1e-9, atol=0)
    with pytest.raises(ValueError, match=r"0\.\.999"):
        d.respace([0, 1000])


# ---------------------------------------------------------------------------- p
def test_learned_range_variance_endpoints() -> None:
    d = GaussianDiffusion.from_config(DiffusionConfig())
    t = _t([1, 100, 999])
    x = torch.randn(3, 2, 4, 4, dtype=torch.float64)
    eps = torch.randn_like(x)
    for v, expected in ((1.0, d.betas), (-1.0, d.posterior_variance), (0.0, None)):
        out = d.p_mean_variance(torch.cat([eps, torch.full_like(x, v)], 1), x, t)
        got = out["variance"][:, 0, 0, 0]
        if expected is None:  # v = 0: geometric mean of β_t and β̃_t
            expected = (d.betas * d.posterior_variance).sqrt()
        torch.testing.assert_close(got, expected[t], rtol=1e-9, atol=0)
    fixed = GaussianDiffusion(d.betas, learn_sigma=False, loss="mse")
    out = fixed.p_mean_variance(eps, x, t)
    torch.testing.assert_close(out["variance"][:, 0, 0, 0], d.posterior_variance[t], rtol=1e-9, atol=0)
    with pytest.raises(ValueError, match="expected 4 channels"):
        d.p_mean_variance(eps, x, t)


def test_p_mean_variance_with_true_eps_recovers_posterior() -> None:
    d = GaussianDiffusion.from_config(DiffusionConfig())
    g = torch.Generator().manual_seed(1)
    x0 = torch.rand(4, 1, 8, 8, generator=g, dtype=torch.float64) * 1.6 - 0.8
    noise = torch.randn(x0.shape, generator=g, dtype=torch.float64)
    t = _t([3, 50, 400, 900])
    xt = d.q_sample(x0, t, noise)
    out = d.p_mean_variance(torch.cat([noise, -torch.ones_like(x0)], 1), xt, t)
    torch.testing.assert_close(out["pred_xstart"], x0, rtol=0, atol=1e-9)
    true_mean, true_var, _ = d.q_posterior_mean_variance(x0, xt, t)
    torch.testing.assert_close(out["mean"], true_mean, rtol=0, atol=1e-9)
    torch.testing.assert_close(out["variance"], true_var, rtol=1e-9, atol=0)
    # Clipping: a prediction far outside [-1, 1] is clamped.
    far = d.p_mean_variance(torch.cat([-50 * torch.ones_like(x0), x0], 1), xt, t)
    assert far["pred_xstart"].abs().max().item() <= 1.0


# ---------------------------------------------------------------------------- losses
class _ParamModel:
    """A "network" whose output is two free tensors, so gradients can be inspected per half."""

    def __init__(self, shape: tuple[int, ...], seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.eps = (0.5 * torch.randn(shape, generator=g)).requires_grad_()
        self.v = (0.3 * torch.randn(shape, generator=g)).requires_grad_()
        self.seen_t: list[torch.Tensor] = []

    def __call__(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        self.seen_t.append(t.clone())
        return torch.cat([self.eps + 0 * x_t, self.v], dim=1)


def test_training_losses_terms_and_stop_gradient() -> None:
    d = GaussianDiffusion.from_config(DiffusionConfig())
    shape = (4, 2, 8, 8)
    model = _ParamModel(shape)
    g = torch.Generator().manual_seed(2)
    x0 = torch.rand(shape, generator=g) * 2 - 1
    noise = torch.randn(shape, generator=g)
    t = _t([0, 10, 500, 999])
    out = d.training_losses(model, x0, t, noise)
    assert {k: v.shape for k, v in out.items()} == {k: (4,) for k in ("loss", "mse", "vb")}
    expected_mse = ((noise - model.eps) ** 2).mean(dim=(1, 2, 3))
    torch.testing.assert_close(out["mse"], expected_mse)
    torch.testing.assert_close(out["loss"], out["mse"] + 0.001 * 1000 * out["vb"])
    assert bool((out["vb"] > 0).all())

    g_eps, g_v = torch.autograd.grad(out["vb"].sum(), [model.eps, model.v], allow_unused=True)
    assert g_eps is None or float(g_eps.abs().max()) == 0.0  # L_vlb never reaches ε
    assert g_v is not None and float(g_v.abs().max()) > 0
    out = d.training_losses(model, x0, t, noise)
    g_eps, g_v = torch.autograd.grad(out["mse"].sum(), [model.eps, model.v], allow_unused=True)
    assert g_eps is not None and float(g_eps.abs().max()) > 0
    assert g_v is None or float(g_v.abs().max()) == 0.0  # L_simple never reaches v


def test_vb_is_zero_kl_for_the_true_posterior_and_small_nll_at_t0() -> None:
    d = GaussianDiffusion.from_config(DiffusionConfig())
    g = torch.Generator().manual_seed(3)
    x0 = (torch.randint(0, 256, (3, 1, 4, 4), generator=g).double() / 127.5) - 1  # 8-bit grid
    noise = torch.randn(x0.shape, generator=g, dtype=torch.float64)
    t = _t([0, 20, 700])
    xt = d.q_sample(x0, t, noise)
    # ε = true noise and v = -1 (σ² = β̃_t) make p_θ the true posterior: KL = 0 for t > 0.
    vb = d.vb_terms_bpd(torch.cat([noise, -torch.ones_like(x0)], 1), x0, xt, t)
    assert vb[1:].abs().max().item() < 1e-9
    # At t = 0 the decoder is N(x_0, β̃_1) with σ ≈ 0.0074 against a bin half-width of 1/255:
    # about 40 % of the mass falls in x_0's bin, i.e. ≈ 1.3 bits, far below the 8 of a flat decoder.
    assert 0 < vb[0].item() < 3


def test_respaced_training_calls_model_with_original_timesteps() -> None:
    d = GaussianDiffusion.from_config(DiffusionConfig()).respace(space_timesteps(1000, 10))
    model = _ParamModel((3, 1, 2, 2))
    d.training_losses(model, torch.zeros(3, 1, 2, 2), _t([0, 5, 9]))
    assert model.seen_t[0].tolist() == [0, d.timestep_map[5].item(), 999]


def test_fixed_sigma_mse_loss() -> None:
    d = GaussianDiffusion(get_named_beta_schedule("linear", 100), learn_sigma=False, loss="mse")
    eps_net = torch.zeros(2, 1, 4, 4, requires_grad=True)
    x0 = torch.zeros(2, 1, 4, 4)
    noise = torch.ones(2, 1, 4, 4)
    out = d.training_losses(lambda x, t: eps_net + 0 * x, x0, _t([3, 60]), noise)
    torch.testing.assert_close(out["loss"], torch.ones(2))  # ‖1 − 0‖² per pixel
    assert out["vb"].requires_grad is False


# ---------------------------------------------------------------------------- v-prediction, weighting
def _cosine(prediction: str, weighting: str = "eps", learn_sigma: bool = False) -> GaussianDiffusion:
    return GaussianDiffusion(get_named_beta_schedule("cosine", 1000), learn_sigma=learn_sigma,
                             loss="hybrid" if learn_sigma else "mse", prediction=prediction,
                             weighting=weighting)


def test_v_target_recovers_x0_and_eps_at_every_noise_level() -> None:
    d = _cosine("v")
    g = torch.Generator().manual_seed(5)
    x0 = torch.rand(4, 2, 8, 8, generator=g, dtype=torch.float64) * 2 - 1
    noise = torch.randn(x0.shape, generator=g, dtype=torch.float64)
    t = _t([0, 500, 950, 999])
    x_t = d.q_sample(x0, t, noise)
    x0_hat, eps_hat = d.predict_xstart_and_eps(d.velocity(x0, noise, t), x_t, t)
    torch.testing.assert_close(x0_hat, x0)
    torch.testing.assert_close(eps_hat, noise)
    # With ε-prediction the same x̂_0 at t = 999 divides by √ᾱ ≈ 5e-5: a 1e-3 error in ε̂ becomes ≈ 20.
    e = _cosine("eps")
    x0_eps, _ = e.predict_xstart_and_eps(noise + 1e-3, x_t, t)
    assert (x0_eps[3] - x0[3]).abs().mean().item() > 10
    x0_v, _ = d.predict_xstart_and_eps(d.velocity(x0, noise, t) + 1e-3, x_t, t)
    assert (x0_v - x0).abs().max().item() < 2e-3


@pytest.mark.parametrize(
    ("prediction", "weighting", "x0_weight"),
    [
        ("eps", "eps", lambda snr: snr),
        ("eps", "min-snr", lambda snr: snr.clamp(max=5.0)),
        ("v", "min-snr", lambda snr: snr.clamp(max=5.0)),
        ("v", "v", lambda snr: snr + 1),
        ("v", "eps", lambda snr: snr),
    ],
)
def test_weighted_loss_is_the_weighted_x0_error(prediction: str, weighting: str, x0_weight: object) -> None:
    """Each weighting, whatever the target, is w(SNR)·‖x_0 − x̂_0‖² for the same wrong x̂_0."""
    d = _cosine(prediction, weighting)
    g = torch.Generator().manual_seed(6)
    x0 = torch.rand(5, 1, 4, 4, generator=g, dtype=torch.float64) * 2 - 1
    noise = torch.randn(x0.shape, generator=g, dtype=torch.float64)
    t = _t([1, 100, 500, 900, 990])
    wrong_x0 = x0 + 0.1 * torch.randn(x0.shape, generator=g, dtype=torch.float64)
    ab = d.alphas_cumprod[t].view(-1, 1, 1, 1)
    wrong_eps = (d.q_sample(x0, t, noise) - ab.sqrt() * wrong_x0) / (1 - ab).sqrt()
    output = wrong_eps if prediction == "eps" else ab.sqrt() * wrong_eps - (1 - ab).sqrt() * wrong_x0
    out = d.training_losses(lambda x, tt: output, x0, t, noise)
    snr = (ab / (1 - ab)).flatten()
    expected = x0_weight(snr) * ((x0 - wrong_x0) ** 2).mean(dim=(1, 2, 3))  # type: ignore[operator]
    torch.testing.assert_close(out["loss"], expected)


def test_eps_weighting_of_eps_prediction_is_the_plain_loss() -> None:
    """Old ε checkpoints keep their exact loss: every weight is 1.0."""
    assert bool((_cosine("eps").mse_weights == 1.0).all())


def test_recipe_is_recorded_and_old_configs_load_as_eps() -> None:
    from model.config import CheckpointConfig, ConfigError, get_preset

    preset = get_preset("demo")
    assert (preset.diffusion.prediction, preset.diffusion.weighting) == ("v", "v")
    cfg = CheckpointConfig(name="m", channel_set=preset.channel_set, model=preset.model,
                           diffusion=preset.diffusion)
    assert CheckpointConfig.from_json(cfg.to_json()).diffusion == preset.diffusion
    old = cfg.to_dict()
    for key in ("prediction", "weighting", "min_snr_gamma"):
        del old["diffusion"][key]
    assert CheckpointConfig.from_dict(old).diffusion.prediction == "eps"
    old["diffusion"]["prediction"] = "x0"
    with pytest.raises(ConfigError, match="unknown prediction"):
        CheckpointConfig.from_dict(old)
