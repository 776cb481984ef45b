"""Known channels with the exact denoiser of a few known slices: the arithmetic, free of model quality."""

from __future__ import annotations

import pytest
import torch

from model import samplers as S
from model.conditioning import KnownChannels
from model.diffusion import GaussianDiffusion, get_named_beta_schedule
from model.seeding import PerSampleNoise
from tests.exact_denoiser import SliceSetDenoiser

pytestmark = pytest.mark.usefixtures("torch_single_thread")

C, H = 3, 8  # two "images" and one "mask" channel


def _slices() -> torch.Tensor:
    """Four slices whose third channel (the mask) differs, images drawn at random."""
    g = torch.Generator().manual_seed(0)
    x = torch.rand(4, C, H, H, generator=g) * 2 - 1
    for k in range(4):
        x[k, 2] = -1.0
        x[k, 2, 2 * k : 2 * k + 3, 1:5] = 1.0  # a blob in a different place per slice
    return x


def _diffusion(prediction: str) -> GaussianDiffusion:
    return GaussianDiffusion(get_named_beta_schedule("cosine", 1000), learn_sigma=True, loss="hybrid",
                             prediction=prediction)


SETTINGS = [("ddpm", 100), ("ddim", 50), ("dpm++", 20)]


@pytest.mark.parametrize(("name", "steps"), SETTINGS)
@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_known_channels_come_back_unchanged(name: str, steps: int, prediction: str) -> None:
    x = _slices()
    d = _diffusion(prediction)
    known = x[torch.tensor([2, 0, 3, 1])]
    noise = PerSampleNoise(7, range(4))
    fn = KnownChannels(SliceSetDenoiser(d, x), d, known, torch.tensor([0.0, 0.0, 1.0]))
    out = S.SAMPLERS[name](fn, d, noise.randn((C, H, H)), steps=steps, noise=noise.randn_like)
    torch.testing.assert_close(out[:, 2], known[:, 2], rtol=0, atol=1e-5)
    # the generated channels are real slices' channels, not blurred averages
    nearest = torch.cdist(out[:, :2].flatten(1), x[:, :2].flatten(1)).min(dim=1).values / H
    assert nearest.max().item() < 0.02


GUIDED = [("ddpm", 100), ("ddim", 50), ("dpm++", 20), ("dpm++sde", 20)]


@pytest.mark.parametrize(("name", "steps"), GUIDED)
@pytest.mark.parametrize(("given", "what"), [(2, "mask → images"), (1, "T1CE → the other channels")])
def test_guidance_returns_the_slice_its_known_channel_names(
    name: str, steps: int, given: int, what: str
) -> None:
    """Each sample is given one channel of a known slice and must come back as that whole slice."""
    x = _slices()
    d = _diffusion("v")
    order = torch.tensor([2, 0, 3, 1])
    channel = torch.zeros(C)
    channel[given] = 1.0
    for seed in range(3):
        noise = PerSampleNoise(seed, range(4))
        fn = KnownChannels(SliceSetDenoiser(d, x), d, x[order], channel, guidance=256.0)
        out = S.SAMPLERS[name](fn, d, noise.randn((C, H, H)), steps=steps, noise=noise.randn_like)
        err = (out - x[order]).abs().amax().item()
        assert err < 1e-3, (what, seed, err)


def test_replacement_alone_is_not_always_coherent() -> None:
    """Why guidance exists: without it, some samples finish on another slice than their mask's."""
    x = _slices()
    d = _diffusion("v")
    order = torch.tensor([2, 0, 3, 1])
    wrong = 0
    for seed in range(6):
        noise = PerSampleNoise(seed, range(4))
        fn = KnownChannels(SliceSetDenoiser(d, x), d, x[order], torch.tensor([0.0, 0.0, 1.0]))
        out = S.sample_dpmpp_2m(fn, d, noise.randn((C, H, H)), steps=20, noise=noise.randn_like)
        nearest = torch.cdist(out[:, :2].flatten(1), x[:, :2].flatten(1)).argmin(dim=1)
        wrong += int((nearest != order).sum())
    assert wrong >= 3, wrong


def test_guidance_needs_a_non_negative_weight() -> None:
    d = _diffusion("v")
    with pytest.raises(ValueError, match="guidance"):
        KnownChannels(lambda x, t: x, d, torch.zeros(1, C, H, H), torch.ones(C), guidance=-1.0)


def test_a_pixel_mask_pins_only_those_pixels_and_the_rest_follows() -> None:
    x = _slices()
    d = _diffusion("v")
    known = x[[2]].clone()
    mask = torch.zeros_like(known)
    mask[:, 2] = 1.0  # the whole mask channel ...
    mask[:, 0, :, :4] = 1.0  # ... and the left half of the first image
    noise = PerSampleNoise(5, [0])
    fn = KnownChannels(SliceSetDenoiser(d, x), d, known, mask)
    out = S.sample_dpmpp_2m(fn, d, noise.randn((C, H, H)), steps=20, noise=noise.randn_like)
    pinned = mask > 0
    torch.testing.assert_close(out[pinned], known[pinned], rtol=0, atol=1e-5)
    assert (out[~pinned] - known[~pinned]).abs().max().item() < 0.05  # the free pixels match slice 2


def test_unknown_pixels_keep_the_network_output_exactly() -> None:
    d = _diffusion("eps")
    g = torch.Generator().manual_seed(3)
    raw = torch.randn(2, 2 * C, H, H, generator=g)
    fn = KnownChannels(lambda x, t: raw, d, torch.zeros(2, C, H, H), torch.tensor([0.0, 1.0, 0.0]))
    out = fn(torch.randn(2, C, H, H, generator=g), torch.tensor([10, 900]))
    assert torch.equal(out[:, [0, 2]], raw[:, [0, 2]]) and torch.equal(out[:, C:], raw[:, C:])
    assert not torch.equal(out[:, 1], raw[:, 1])


def test_bad_shapes_are_refused() -> None:
    d = _diffusion("v")
    with pytest.raises(ValueError, match="does not fit"):
        KnownChannels(lambda x, t: x, d, torch.zeros(2, C, H, H), torch.ones(4))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        KnownChannels(lambda x, t: x, d, torch.zeros(2, C, H, H), torch.tensor([2.0, 0, 0]))


def test_known_channels_keep_no_autograd_graph_of_a_plain_module() -> None:
    d = _diffusion("eps")
    conv = torch.nn.Conv2d(C, 2 * C, 1)  # parameters require grad, as an untouched network's do
    x = _slices()
    wrapped = KnownChannels(lambda x_t, t: conv(x_t), d, x, torch.tensor([1.0, 0.0, 0.0]))
    out = wrapped(x, torch.full((4,), 500))
    assert not out.requires_grad and out.grad_fn is None
