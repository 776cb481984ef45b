"""UNet: shapes for every preset, initialisation, conditioning, attention placement, gradients, batching."""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

# openai/improved-diffusion's 64² research architecture with 2 channels (121 M parameters).
from benchmarks.sampling import RESEARCH_2CH_64
from model.config import PRESETS, DiffusionConfig
from model.diffusion import GaussianDiffusion
from model.inference import InferenceModel, cpu_has_native_bf16, prepare_for_inference, resolve_precision
from model.inference_modules import OneDnnConv2d, batch_invariant_group_norm
from model.samplers import sample_ddim
from model.unet import AttentionBlock, ResBlock, UNetModel, timestep_embedding
from tests.skip_policy import NO_BF16


def _randomise(model: nn.Module, seed: int = 0) -> nn.Module:
    """Replace zero-initialised layers with random weights so every path carries signal."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if not p.any():
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return model


def _tiny(**kw: object) -> UNetModel:
    torch.manual_seed(0)
    return UNetModel(replace(PRESETS["tiny"].model, **kw))  # type: ignore[arg-type]


def test_research_2ch_64_parameter_count_matches_improved_diffusion() -> None:
    with torch.device("meta"):
        m = UNetModel(RESEARCH_2CH_64)
    n = sum(p.numel() for p in m.parameters())
    # openai/improved-diffusion reports ~121 M for this config.
    assert abs(n - 121.06e6) < 0.1e6, n


@pytest.mark.parametrize("name", ["research-1ch", "research-2ch", "research-5ch", "base-128", "base-64"])
def test_large_presets_output_shape_on_meta(name: str) -> None:
    cfg = PRESETS[name].model
    with torch.device("meta"):
        m = UNetModel(cfg)
        x = torch.empty(2, cfg.in_channels, cfg.image_size, cfg.image_size)
        out = m(x, torch.empty(2))
    assert out.shape == (2, cfg.out_channels, cfg.image_size, cfg.image_size)


@pytest.mark.parametrize("name", ["demo", "tiny"])
def test_small_presets_forward(name: str) -> None:
    cfg = PRESETS[name].model
    torch.manual_seed(0)
    m = _randomise(UNetModel(cfg)).eval()
    x = torch.randn(2, cfg.in_channels, cfg.image_size, cfg.image_size)
    with torch.no_grad():
        out = m(x, torch.tensor([3, 700]))
    assert out.shape == (2, cfg.out_channels, cfg.image_size, cfg.image_size)
    assert torch.isfinite(out).all()
    assert out.std() > 1e-3


def test_untrained_output_is_exactly_zero() -> None:
    m = _tiny().eval()
    with torch.no_grad():
        out = m(torch.randn(2, 2, 32, 32), torch.tensor([0, 999]))
    assert torch.count_nonzero(out) == 0
    assert not any(p.any() for p in m.out_conv.parameters())


def test_timestep_changes_output() -> None:
    m = _randomise(_tiny()).eval()
    x = torch.randn(1, 2, 32, 32).repeat(2, 1, 1, 1)
    with torch.no_grad():
        out = m(x, torch.tensor([10, 900]))
    assert (out[0] - out[1]).abs().max() > 1e-3
    # float and long timesteps mean the same thing.
    with torch.no_grad():
        assert torch.equal(m(x, torch.tensor([10, 900])), m(x, torch.tensor([10.0, 900.0])))


def test_timestep_embedding_values() -> None:
    emb = timestep_embedding(torch.tensor([0.0, 1.0]), 8)
    assert emb.shape == (2, 8)
    # t=0: cos terms 1, sin terms 0; t=1 first frequency is 1 rad.
    assert torch.equal(emb[0], torch.tensor([1.0] * 4 + [0.0] * 4))
    assert emb[1, 0].item() == pytest.approx(torch.cos(torch.tensor(1.0)).item())
    assert emb[1, 4].item() == pytest.approx(torch.sin(torch.tensor(1.0)).item())


def test_attention_placement_follows_feature_map_size() -> None:
    with torch.device("meta"):
        m = UNetModel(RESEARCH_2CH_64)
    # 3 down blocks at 16 and 8, the middle at 8, 4 up blocks at 8 and 16.
    assert m.attention_sizes == [16] * 3 + [8] * 3 + [8] + [8] * 4 + [16] * 4
    assert sum(isinstance(mod, AttentionBlock) for mod in m.modules()) == 15
    heads = {mod.num_heads for mod in m.modules() if isinstance(mod, AttentionBlock)}
    assert heads == {4}
    with torch.device("meta"):
        m64 = UNetModel(replace(RESEARCH_2CH_64, num_head_channels=64))
    assert {mod.num_heads for mod in m64.modules() if isinstance(mod, AttentionBlock)} == {
        6,
        8,
    }  # 384 ch at 16², 512 at 8²


def test_resblock_updown_and_dropout_variant() -> None:
    m = _randomise(_tiny(resblock_updown=True, dropout=0.1, use_scale_shift_norm=False))
    n_res = sum(isinstance(mod, ResBlock) for mod in m.modules())
    assert n_res == sum(isinstance(mod, ResBlock) for mod in _tiny().modules()) + 4
    m.train()
    x, t = torch.randn(2, 2, 32, 32), torch.tensor([1, 2])
    assert not torch.equal(m(x, t), m(x, t))  # dropout is live in training
    m.eval()
    with torch.no_grad():
        assert torch.equal(m(x, t), m(x, t))


def test_gradient_reaches_every_parameter() -> None:
    m = _randomise(_tiny()).train()
    out = m(torch.randn(2, 2, 32, 32), torch.tensor([5, 500]))
    out.square().mean().backward()
    missing = [n for n, p in m.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert missing == []


def test_bad_input_raises_one_line_error() -> None:
    m = _tiny()
    with pytest.raises(ValueError, match=r"expected x of shape \(N, 2, H, W\)"):
        m(torch.randn(1, 3, 32, 32), torch.tensor([0]))
    with pytest.raises(ValueError, match="expected t of shape"):
        m(torch.randn(2, 2, 32, 32), torch.tensor([0]))


def test_forward_is_batch_invariant_within_tolerance() -> None:
    """Row i of a batch equals the forward of that row alone (float32 CPU)."""
    m = _randomise(UNetModel(PRESETS["demo"].model)).eval()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 5, 64, 64, generator=g)
    t = torch.tensor([0, 500, 999])
    with torch.inference_mode():
        batched = m(x, t)
        alone = torch.cat([m(x[i : i + 1], t[i : i + 1]) for i in range(3)])
    err = (batched - alone).abs().max().item()
    scale = batched.abs().max().item()
    # Measured ≈1e-6 relative on AVX-512 CPU float32; the contract allows 1e-3.
    assert err <= 1e-5 * max(scale, 1.0), (err, scale)


# ---------------------------------------------------------------------------- optimised inference path
needs_bf16 = pytest.mark.skipif(
    not torch.backends.mkldnn.is_available() or not torch.ops.mkldnn._is_mkldnn_bf16_supported(),
    reason=NO_BF16,
)


def _prepared(net: nn.Module, **kw: object) -> InferenceModel:
    return prepare_for_inference(copy.deepcopy(net), "cpu", **kw)  # type: ignore[arg-type]


@needs_bf16
def test_prepare_converts_body_and_keeps_small_parts_float32() -> None:
    fn = _prepared(_tiny(), precision="bf16")
    net = fn.net
    assert isinstance(net, UNetModel)
    assert fn.dtype == torch.bfloat16 and net.dtype == torch.bfloat16
    assert net.input_blocks[1][0].in_conv.weight.dtype == torch.bfloat16  # type: ignore[index]
    assert net.input_blocks[1][0].in_conv.weight.is_contiguous(memory_format=torch.channels_last)  # type: ignore[index]
    float32_parts = [net.time_embed, net.out_conv, net.out_norm, net.input_blocks[1][0].emb_proj]  # type: ignore[index]
    assert all(p.dtype == torch.float32 for part in float32_parts for p in part.parameters())
    assert not net.training
    out = fn(torch.randn(3, 2, 32, 32), torch.tensor([1, 2, 3]))
    assert out.dtype == torch.float32 and out.shape == (3, 4, 32, 32)


@needs_bf16
def test_bf16_output_is_close_to_float32() -> None:
    net = _randomise(_tiny()).eval()
    x, t = torch.randn(4, 2, 32, 32), torch.tensor([0, 300, 600, 999])
    with torch.inference_mode():
        ref = net(x, t)
    out = _prepared(net, precision="bf16")(x, t)
    rel = ((out - ref).abs().max() / (ref.max() - ref.min())).item()
    # bf16 keeps 8 mantissa bits: ~0.5 % per op, measured ≈3e-3 of the range here.
    assert 0 < rel < 2e-2, rel
    # float32 + channels_last differs from the NCHW eager net only by summation order.
    fp32 = _prepared(net, precision="fp32", micro_batch=0)(x, t)
    assert (fp32 - ref).abs().max() <= 1e-5 * (ref.max() - ref.min())


def _ddim_20(
    model_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], x_T: torch.Tensor
) -> torch.Tensor:
    diffusion = GaussianDiffusion.from_config(DiffusionConfig())
    return sample_ddim(model_fn, diffusion, x_T, steps=20, noise=torch.randn_like)


@pytest.mark.parametrize(
    ("precision", "micro_batch"),
    [
        ("fp32", 0),
        pytest.param("bf16", 0, marks=needs_bf16),
        pytest.param("bf16", 2, marks=needs_bf16),
    ],
)
def test_optimised_path_is_batch_invariant_over_20_step_sampling(precision: str, micro_batch: int) -> None:
    """Sample i of a batch of 3 equals sample i sampled alone, over a 20-step DDIM run.

    Before the GroupNorm padding and the per-row embedding matmuls, whole-batch bf16
    sampling drifted by 0.24 of the intensity range on this random net (one bf16
    rounding flip, amplified over 20 steps); float32 differed in the last bits until its
    convolutions were all sent to oneDNN (a lone sample's small maps went to another
    kernel). Whole batches and a fixed micro-batch are bit-identical in both precisions.
    """
    net = _randomise(_tiny()).eval()
    x_T = torch.randn(3, 2, 32, 32, generator=torch.Generator().manual_seed(3))
    fn = _prepared(net, precision=precision, micro_batch=micro_batch)
    together = _ddim_20(fn, x_T)
    alone = torch.cat([_ddim_20(fn, x_T[i : i + 1]) for i in range(3)])
    assert together.abs().max() > 0.1  # a real, non-trivial sample
    assert torch.equal(together, alone)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize(("kernel", "size"), [(3, 8), (3, 16), (1, 16), (3, 32)])
def test_float32_convolutions_do_not_depend_on_the_batch(kernel: int, size: int, threads: int) -> None:
    """A lone sample's float32 convolution equals its row of a batch, bit for bit (PyTorch's own
    choice sends a lone sample's small maps to another kernel: the 3x3 cases fail with nn.Conv2d)."""
    torch.manual_seed(kernel * 100 + size)
    conv = nn.Conv2d(64, 64, kernel, padding=kernel // 2).eval()
    fixed = OneDnnConv2d.replacing(conv)
    x = torch.randn(16, 64, size, size).contiguous(memory_format=torch.channels_last)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with torch.inference_mode():
            alone = [fixed(x[i : i + 1]) for i in range(16)]
            assert all(torch.equal(fixed(x[:n])[i], alone[i][0]) for n in (2, 16) for i in range(n))
            torch.testing.assert_close(torch.cat(alone), conv(x), rtol=1e-5, atol=1e-5)
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("dtype", [torch.float32, pytest.param(torch.bfloat16, marks=needs_bf16)])
def test_group_norm_statistics_do_not_depend_on_the_batch(dtype: torch.dtype) -> None:
    x = torch.randn(3, 64, 32, 32, generator=torch.Generator().manual_seed(0)).to(dtype)
    x = x.contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        rows = [batch_invariant_group_norm(x[: i + 1], 8, 1e-5)[i] for i in range(3)]
        for n in (1, 2, 3):
            batched = batch_invariant_group_norm(x[:n], 8, 1e-5)
            assert all(torch.equal(batched[i], rows[i]) for i in range(n))
        plain = F.group_norm(x.float(), 8)
    assert (torch.stack(rows).float() - plain).abs().max() < (1e-5 if dtype == torch.float32 else 3e-2)


def test_precision_choice_and_errors() -> None:
    assert resolve_precision("cpu", "fp32") == torch.float32
    assert resolve_precision("cpu", "auto") == (torch.bfloat16 if cpu_has_native_bf16() else torch.float32)
    with pytest.raises(ValueError, match="unknown precision 'fp8'"):
        resolve_precision("cpu", "fp8")
    with pytest.raises(ValueError, match="fp16 is not supported on CPU"):
        resolve_precision("cpu", "fp16")
    with pytest.raises(ValueError, match="micro_batch must be"):
        _prepared(_tiny(), micro_batch=-1)
