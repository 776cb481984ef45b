"""int8 convolutions (opt-in precision "int8"): accuracy, padding, per-sample scales, batch invariance."""

from __future__ import annotations

import copy
import shutil
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from model import quantize
from model.config import PRESETS, DiffusionConfig
from model.diffusion import GaussianDiffusion
from model.inference import prepare_for_inference, resolve_precision, resolved_precision_name
from model.quantize import Int8Conv2d, Int8Linear, int8_supported
from model.samplers import sample_ddim
from model.unet import AttentionBlock, NormAct, ResBlock, UNetModel
from tests.skip_policy import NO_VNNI

needs_int8 = pytest.mark.skipif(not int8_supported(), reason=NO_VNNI)


def _conv(c_in: int, c_out: int, stride: int = 1, seed: int = 0) -> nn.Conv2d:
    torch.manual_seed(seed)
    conv = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1)
    with torch.no_grad():
        conv.bias.normal_(0, 0.1)
    return conv


def _rel_err(out: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    return (out.float() - ref).abs() / (ref.max() - ref.min())


@needs_int8
@pytest.mark.parametrize("stride", [1, 2])
def test_int8_conv_matches_float_conv_including_the_zero_padded_border(stride: int) -> None:
    conv = _conv(64, 48, stride)
    # SiLU-like activations: what the UNet's convolutions see (mostly positive, long upper tail).
    x = F.silu(torch.randn(3, 64, 16, 16, generator=torch.Generator().manual_seed(1)) * 2)
    ref = conv(x).detach()
    out = Int8Conv2d(conv)(x.contiguous(memory_format=torch.channels_last))
    err = _rel_err(out, ref)
    # 8-bit codes for weights and activations: measured ≈0.5 % of the range at worst.
    assert err.max() < 0.02, err.max()
    assert err.mean() < 0.003, err.mean()
    # Padding must count as activation 0 (code 128), not as code 0 (= −128·s): the border
    # would be off by the whole activation range then.
    border = torch.cat([err[..., 0, :].flatten(), err[..., -1, :].flatten(), err[..., :, 0].flatten()])
    assert border.max() < 0.02, border.max()


@needs_int8
def test_int8_1x1_conv_matches_the_float_one() -> None:
    torch.manual_seed(0)
    conv = nn.Conv2d(96, 48, 1)
    x = F.silu(torch.randn(3, 96, 8, 8, generator=torch.Generator().manual_seed(1)) * 2)
    ref = conv(x).detach()
    layer = Int8Linear(conv)
    with torch.inference_mode():
        out = layer(x.contiguous(memory_format=torch.channels_last))
        tokens = layer.project(x.permute(0, 2, 3, 1).reshape(3, 64, 96))
    assert out.shape == ref.shape and torch.equal(tokens, out.permute(0, 2, 3, 1).reshape(3, 64, 48))
    err = _rel_err(out, ref)
    assert err.max() < 0.02 and err.mean() < 0.003, (err.max(), err.mean())


@needs_int8
@pytest.mark.parametrize("kind", ["3x3", "1x1"])
def test_int8_layers_scale_each_sample_on_its_own(kind: str) -> None:
    """A neighbour 1000× larger in the batch changes no bit of a sample (a per-batch scale would
    crush the small sample to a handful of codes)."""
    conv = Int8Conv2d(_conv(32, 32)) if kind == "3x3" else Int8Linear(nn.Conv2d(32, 32, 1))
    g = torch.Generator().manual_seed(2)
    small = torch.randn(1, 32, 8, 8, generator=g)
    big = 1000 * torch.randn(1, 32, 8, 8, generator=g)
    for dtype in (torch.float32, torch.bfloat16):
        alone = conv(small.to(dtype).contiguous(memory_format=torch.channels_last))
        batch = torch.cat([big, small, big]).to(dtype).contiguous(memory_format=torch.channels_last)
        together = conv(batch)
        assert together.dtype == dtype and torch.equal(together[1:2], alone)


def _normalised_map(n: int = 4, c: int = 64) -> tuple[NormAct, torch.Tensor, tuple[torch.Tensor, ...]]:
    g = torch.Generator().manual_seed(5)
    norm = NormAct(16, c)
    with torch.no_grad():
        norm.norm.weight.copy_(1 + 0.2 * torch.randn(c, generator=g))
        norm.norm.bias.copy_(0.2 * torch.randn(c, generator=g))
    x = (3 * torch.randn(n, c, 16, 16, generator=g) + 1).bfloat16()
    x = x.contiguous(memory_format=torch.channels_last)
    scale_shift = (0.3 * torch.randn(n, c, generator=g), 0.3 * torch.randn(n, c, generator=g))
    return norm, x, scale_shift


@needs_int8
def test_norm_act_fused_into_the_int8_conv_is_closer_to_float_than_the_unfused_ops() -> None:
    norm, x, scale_shift = _normalised_map()
    float_conv = _conv(64, 32)
    conv = Int8Conv2d(float_conv)
    with torch.inference_mode():
        fused = conv.forward_after_norm(norm, x, scale_shift)
        activation = norm(x.float(), scale_shift)
        unfused = conv(activation.bfloat16().contiguous(memory_format=torch.channels_last))
        ref = float_conv(activation)
    # Inductor compiled it wherever a C++ compiler is installed (as on this project's machines).
    assert quantize._fusion_failed is not bool(shutil.which("c++") or shutil.which("g++"))
    fused_err, unfused_err = _rel_err(fused, ref), _rel_err(unfused, ref)
    # SiLU outputs coded with 0.0 at code 32 get ≈1.75× finer steps than symmetric codes.
    assert fused_err.mean() < 0.75 * unfused_err.mean(), (fused_err.mean(), unfused_err.mean())
    assert fused_err.max() < 0.02
    # The border, where oneDNN pads with the zero point, is as good as the rest.
    edges = (fused_err[..., 0, :], fused_err[..., -1, :], fused_err[..., 0], fused_err[..., -1])
    border = torch.cat([e.flatten() for e in edges])
    assert border.mean() < 1.5 * fused_err.mean(), (border.mean(), fused_err.mean())


@needs_int8
def test_group_norm_folded_into_the_affine_matches_group_norm_and_is_batch_invariant() -> None:
    g = torch.Generator().manual_seed(6)
    # Residual-stream-like activations: a mean well away from zero, as in the UNet's trunk.
    x = (3 * torch.randn(5, 64, 32, 32, generator=g) + 2).bfloat16()
    x = x.contiguous(memory_format=torch.channels_last)
    w, b = 1 + 0.2 * torch.randn(5, 64, generator=g), 0.2 * torch.randn(5, 64, generator=g)
    kernel = quantize.group_norm_coefficients_eager
    with torch.inference_mode():
        w2, b2 = quantize.fused(kernel, x, w, b, 16, 1e-5)
        alone = [quantize.fused(kernel, x[i : i + 1], w[i : i + 1], b[i : i + 1], 16, 1e-5) for i in range(5)]
    ref = F.group_norm(x.double(), 16, eps=1e-5) * w.double()[:, :, None, None] + b.double()[:, :, None, None]
    folded = x.double() * w2.double()[:, :, None, None] + b2.double()[:, :, None, None]
    assert (folded - ref).abs().max() < 1e-4, (folded - ref).abs().max()
    for i, (wi, bi) in enumerate(alone):
        assert torch.equal(wi, w2[i : i + 1]) and torch.equal(bi, b2[i : i + 1]), i


@needs_int8
@pytest.mark.parametrize(
    ("act", "gain", "shift"),
    [(True, 1.0, 0.0), (True, 1.0, 4.0), (True, 1.0, -7.0), (True, 0.3, -0.8), (False, 1.0, 0.0)],
)
def test_quantising_codes_each_value_to_the_nearest_step_and_uses_the_range(
    act: bool, gain: float, shift: float
) -> None:
    """SiLU's range is derived from its input's: inputs wholly above or below SiLU's minimum at
    -1.28 (shift 4, -7), and inputs around it whose negative tail sets the step (0.3, -0.8)."""
    norm, x, scale_shift = _normalised_map()
    w, b = norm.coefficients(4, scale_shift)
    w, b = w * gain, b * gain + shift
    h = norm.normalised(x)
    zero = quantize.input_zero_point(act)
    with torch.inference_mode():
        codes, step = quantize.fused(quantize.act_quantise_eager, h, w, b, act)
        eager_codes, eager_step = quantize.act_quantise_eager(h, w, b, act)
        y = torch.addcmul(b[:, :, None, None], h.float(), w[:, :, None, None])
        y = F.silu(y) if act else y
    torch.testing.assert_close(step, eager_step, rtol=1e-6, atol=0)
    # Only exp's last bit may differ (inductor's vectorised exp vs ATen's).
    differ = codes.int() - eager_codes.int()
    assert differ.abs().max() <= 1 and (differ != 0).float().mean() < 1e-3
    assert codes.dtype == torch.uint8 and step.shape == (4, 1, 1, 1)
    decoded = (codes.float() - zero) * step
    assert ((decoded - y).abs() <= 0.5001 * step).all()
    # Each sample reaches code 255 (its max sets the step) or code 0 (its min does).
    top, bottom = codes.flatten(1).amax(1), codes.flatten(1).amin(1)
    assert ((top == 255) | (bottom == 0)).all(), (top, bottom)


@needs_int8
def test_without_a_compiler_the_int8_conv_quantises_unfused(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def broken(*args: object) -> tuple[torch.Tensor, torch.Tensor]:
        raise RuntimeError("InvalidCxxCompiler: no working C++ compiler found")

    _, x, _ = _normalised_map()
    conv = Int8Conv2d(_conv(64, 32))
    with torch.inference_mode():
        expected = conv._convolve(*quantize.quantise_eager(x), quantize.ZERO_POINT, x.dtype)
        monkeypatch.setattr(quantize, "_compiled", lambda kernel: broken)
        monkeypatch.setattr(quantize, "_fusion_failed", False)
        assert torch.equal(conv(x), expected)
    assert quantize._fusion_failed and "no working C++ compiler" in caplog.text


def _tiny_random() -> UNetModel:
    torch.manual_seed(0)
    net = UNetModel(replace(PRESETS["tiny"].model))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in net.parameters():
            if not p.any():
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return net.eval()


@needs_int8
def test_int8_unet_quantises_the_body_and_stays_close_to_float32() -> None:
    net = _tiny_random()
    fn = prepare_for_inference(copy.deepcopy(net), "cpu", precision="int8")
    prepared = fn.net
    assert isinstance(prepared, UNetModel)
    int8 = [m for m in prepared.modules() if isinstance(m, Int8Conv2d)]
    assert len(int8) >= 10
    # Attention projections and 1×1 skips run as int8 matmuls.
    blocks = [m for m in prepared.modules() if isinstance(m, AttentionBlock)]
    res_blocks = [m for m in prepared.modules() if isinstance(m, ResBlock)]
    skips = [m.skip for m in res_blocks if not isinstance(m.skip, nn.Identity)]
    assert blocks and skips
    assert all(isinstance(b.qkv, Int8Linear) and isinstance(b.proj_out, Int8Linear) for b in blocks)
    assert all(isinstance(s, Int8Linear) for s in skips)
    # The thin input layer and the head stay float.
    assert isinstance(prepared.input_blocks[0][0], nn.Conv2d) and isinstance(prepared.out_conv, nn.Conv2d)
    x, t = torch.randn(4, 2, 32, 32), torch.tensor([0, 300, 600, 999])
    with torch.inference_mode():
        ref = net(x, t)
    err = _rel_err(fn(x, t), ref).max()
    bf16 = _rel_err(prepare_for_inference(copy.deepcopy(net), "cpu", precision="bf16")(x, t), ref).max()
    # Measured here: int8 ≈2–3 % of the output range, bf16 ≈0.3–0.7 %.
    assert bf16 < err < 0.06, (err, bf16)


@needs_int8
@pytest.mark.parametrize("kernels", ["compiled", "eager"])
def test_int8_sampling_is_batch_invariant_over_20_ddim_steps(
    kernels: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # "eager": the fallback where inductor cannot compile must keep the guarantee too.
    monkeypatch.setattr(quantize, "_fusion_failed", kernels == "eager")
    fn = prepare_for_inference(_tiny_random(), "cpu", precision="int8")
    diffusion = GaussianDiffusion.from_config(DiffusionConfig())
    x_T = torch.randn(3, 2, 32, 32, generator=torch.Generator().manual_seed(3))
    together = sample_ddim(fn, diffusion, x_T, steps=20, noise=torch.randn_like)
    alone = torch.cat(
        [sample_ddim(fn, diffusion, x_T[i : i + 1], steps=20, noise=torch.randn_like) for i in range(3)]
    )
    assert together.abs().max() > 0.1
    assert torch.equal(together, alone)


def test_int8_errors_say_why(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ValueError, match="int8 runs on CPU only"):
        resolve_precision("cuda", "int8")
    monkeypatch.setattr(quantize, "cpu_has_vnni", lambda: False)
    with pytest.raises(ValueError, match="needs a CPU with VNNI"):
        resolve_precision("cpu", "int8")
    assert resolved_precision_name("cpu", "fp32") == "fp32"


@needs_int8
def test_int8_resolves_by_name() -> None:
    assert resolved_precision_name("cpu", "int8") == "int8"
