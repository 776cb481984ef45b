"""int8 layers for CPU sampling: int8 weights per output channel, uint8 activations per sample.

Why: on a CPU with VNNI (AVX512-VNNI, AMX) oneDNN's u8×s8 convolutions and matmuls do
twice the multiply-adds per cycle of its bf16 ones (measured on Zen 5: ≈2.0 vs ≈1.0 TOP/s),
and convolutions are ≈80 % of a bf16 UNet forward.

How, and why it stays batch-invariant: each sample's activation map is coded with its own
step (tokens of a matmul: each token with its own), so a sample's codes do not depend on
its batch neighbours; oneDNN accumulates the integer products exactly in int32 and scales
them by the per-channel weight scale; the step and the bias are applied afterwards, per
element. No step mixes samples, so sample i is bit-identical whatever the batch. Dynamic
per-sample steps also follow the activations' range across timesteps, which static
calibrated scales would not (Q-Diffusion, Li et al. 2023).

Speed comes from fusing: a ResBlock's GroupNorm statistics are one inductor-compiled pass
that folds them into the affine + FiLM, and that affine, the SiLU and the quantising are a
second (`fused`) that writes the uint8 codes — the normalised map is never written, so the
int8 path spends little besides the integer kernels. Quality: 0.0 sits at code 128 for
inputs spread around zero but at code 32 for SiLU outputs, which are ≥ -0.28, so their
positive side gets 223 codes instead of 127. The error is still larger than bf16's (see
benchmarks/RESULTS.md): this is the "int8" precision, opt-in.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from model.cpu_features import cpu_flags

if TYPE_CHECKING:
    from model.unet import NormAct, ResBlock

log = logging.getLogger(__name__)

QMAX = 127  # symmetric int8 weight codes -127..127
ZERO_POINT = 128  # activation code of 0.0 for inputs that spread around zero
# SiLU outputs lie in [-0.28, max]: with 0.0 at code 32 the positive side gets 223 codes, not
# 127, so the step is ≈1.75× finer (set by the sample's max, or by its min when that needs more).
SILU_ZERO_POINT = 32
SILU_ARGMIN = -1.2784645  # where SiLU has its minimum, -0.2784645
LEVELS = 255  # uint8 activation codes 0..255


def cpu_has_vnni() -> bool:
    """True when oneDNN has native int8 dot products here (AVX512-VNNI, AVX-VNNI or AMX-INT8)."""
    return bool(cpu_flags() & {"avx512_vnni", "avx_vnni", "amx_int8"})


def int8_supported() -> bool:
    ops = torch.ops.onednn
    return torch.backends.mkldnn.is_available() and hasattr(ops, "qconv2d_pointwise") and cpu_has_vnni()


def _codes(
    y: torch.Tensor, dims: tuple[int, ...], zero_point: int = ZERO_POINT
) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 codes of float32 `y`, one step per slice over `dims` (keepdim): 0.0 is code
    `zero_point` (the code oneDNN pads with), and the step is the finest one that fits the
    slice's max above it and its min below it."""
    return _codes_in_range(y, y.amin(dim=dims, keepdim=True), y.amax(dim=dims, keepdim=True), zero_point)


def _codes_in_range(
    y: torch.Tensor, low: torch.Tensor, high: torch.Tensor, zero_point: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes of `y` whose values lie within [low, high] (broadcast), 0.0 at code `zero_point`."""
    step = torch.maximum(high / (LEVELS - zero_point), low / -zero_point).clamp_min(1e-12)
    # Truncating y/step + zero point + 0.5 (within [0.5, 255.5]) rounds half up.
    return (y * (1 / step) + (zero_point + 0.5)).to(torch.uint8), step


def quantise_eager(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample uint8 codes and float32 steps (N, 1, 1, 1) of a map `x`, 0.0 at code 128."""
    return _codes(x.float(), (1, 2, 3))


def quantise_tokens_eager(tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 codes of (…, C) tokens with one step per token, shape (…, 1); 0.0 at code 128."""
    return _codes(tokens.float(), (-1,))


def group_norm_coefficients_eager(
    x: torch.Tensor, w: torch.Tensor, b: torch.Tensor, groups: int, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, C) float32 `w'`, `b'` with x·w' + b' = GroupNorm(x)·w + b: the statistics folded into
    the affine, so the normalised map is never written. Per-channel sums and sums of squares
    are one vectorised pass over a channels_last map (3.5× faster than ATen's GroupNorm here,
    which also writes its output in bf16); accumulated in float32, 2e-5 from a float64
    GroupNorm on activations of mean 2, std 3."""
    n, c, height, width = x.shape
    xf = x.float()
    count = height * width * (c // groups)
    total = xf.sum(dim=(2, 3)).view(n, groups, -1).sum(-1, keepdim=True)
    squares = (xf * xf).sum(dim=(2, 3)).view(n, groups, -1).sum(-1, keepdim=True)
    mean = total / count
    rstd = torch.rsqrt((squares / count - mean * mean).clamp_min(0) + eps)
    scale = w.view(n, groups, -1) * rstd
    return scale.view(n, c), (b.view(n, groups, -1) - mean * scale).view(n, c)


def act_quantise_eager(
    h: torch.Tensor, w: torch.Tensor, b: torch.Tensor, act: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes and steps of act(h·w + b) for a map `h` and float32 (N, C) `w`, `b`, computed in
    float32; 0.0 is code `input_zero_point(act)`."""
    z = torch.addcmul(b[:, :, None, None], h.float(), w[:, :, None, None])
    if not act:
        return _codes(z, (1, 2, 3))
    # The range of SiLU over a sample follows from the range of its input (SiLU falls to its
    # minimum at SILU_ARGMIN, then rises), so the reduction pass reads z = h·w + b, cheap to
    # recompute, and the exp runs once, in the coding pass: inductor then keeps no float32 copy
    # of the map (reading it back was 3× the traffic of the fused kernel).
    z_min, z_max = z.amin(dim=(1, 2, 3), keepdim=True), z.amax(dim=(1, 2, 3), keepdim=True)
    low = F.silu(z_min.clamp(min=SILU_ARGMIN).minimum(z_max))
    # The max is SiLU(z_max) when z_max ≥ 0; below, every value is negative and the step is
    # set by `low` alone.
    high = F.silu(z_max)
    return _codes_in_range(F.silu(z), low, high, SILU_ZERO_POINT)


def input_zero_point(silu: bool) -> int:
    return SILU_ZERO_POINT if silu else ZERO_POINT


Kernel = Callable[..., tuple[torch.Tensor, torch.Tensor]]


@functools.cache
def _compiled(kernel: Kernel) -> Kernel | None:
    try:
        return torch.compile(kernel, dynamic=True)
    except Exception as exc:  # no compiler backend: the eager kernel is the fallback
        log.warning("int8: torch.compile unavailable (%s); quantising unfused", exc)
        return None


_fusion_failed = False


def fused(kernel: Kernel, *args: object) -> tuple[torch.Tensor, torch.Tensor]:
    """Run one of the `*_eager` kernels above compiled by inductor: it reads the map once or twice
    and writes only codes (or coefficients), no float32 temporaries. Unfused, norm + SiLU +
    quantising took 6–8 passes over the map (≈15 % of an int8 forward).

    Why this is batch-invariant: the kernels are elementwise except per-sample (or per-token)
    max and min, exact in any order, and the GroupNorm sums, which inductor accumulates for each
    sample in one thread in a fixed order whatever the batch (tested, batch 1 included). Falls
    back to the eager kernel (same arithmetic; its exp may differ in the last bit) where
    inductor cannot compile, e.g. without a C++ compiler.
    """
    global _fusion_failed
    compiled = None if _fusion_failed else _compiled(kernel)
    if compiled is not None:
        try:
            return compiled(*args)
        except Exception as exc:  # inductor compiles on the first call and may fail there
            _fusion_failed = True
            log.warning("int8: fused quantisation failed to compile (%s); quantising unfused", exc)
    return kernel(*args)


class Int8Conv2d(nn.Module):
    """A frozen nn.Conv2d whose forward runs oneDNN's int8 convolution (CPU, inference only)."""

    def __init__(self, conv: nn.Conv2d) -> None:
        super().__init__()
        self.stride, self.padding = list(conv.stride), list(conv.padding)
        self.dilation, self.groups = list(conv.dilation), conv.groups
        if not isinstance(conv.padding, tuple):
            raise ValueError(f"padding {conv.padding!r} is not supported for int8")
        self.in_channels, self.out_channels = conv.in_channels, conv.out_channels
        self.qweight, self.w_scale = _int8_weights(conv.weight)
        self.w_zero_point = torch.zeros(conv.out_channels, dtype=torch.int64)
        self._packed: dict[tuple[int, int, int], torch.Tensor] = {}
        bias = conv.bias.detach() if conv.bias is not None else torch.zeros(conv.out_channels)
        self.bias = bias.float().cpu()

    def packed(self, height: int, width: int, zero_point: int) -> torch.Tensor:
        """The weights in oneDNN's blocked layout for this feature-map size (2.3× faster than a
        shape-agnostic packing on 8×8 maps); any batch size can use it, the arithmetic is exact."""
        key = (height, width, zero_point)
        if key not in self._packed:
            # The input scale is 1: the per-sample step is applied to the output instead.
            self._packed[key] = torch.ops.onednn.qconv_prepack(
                self.qweight, self.w_scale, 1.0, zero_point, self.stride, self.padding, self.dilation,
                self.groups, [1, self.in_channels, height, width],
            )  # fmt: skip
        return self._packed[key]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        codes, step = fused(quantise_eager, x)
        return self._convolve(codes, step, ZERO_POINT, x.dtype)

    def forward_after_norm(
        self, norm: NormAct, x: torch.Tensor, scale_shift: tuple[torch.Tensor, torch.Tensor] | None
    ) -> torch.Tensor:
        """self(norm(x, scale_shift)) with the norm's affine, FiLM and SiLU fused into the quantising."""
        w, b = norm.coefficients(x.shape[0], scale_shift)
        w, b = fused(group_norm_coefficients_eager, x, w, b, norm.norm.num_groups, norm.norm.eps)
        codes, step = fused(act_quantise_eager, x, w, b, norm.act)
        return self._convolve(codes, step, input_zero_point(norm.act), x.dtype)

    def _convolve(
        self, codes: torch.Tensor, step: torch.Tensor, zero_point: int, dtype: torch.dtype
    ) -> torch.Tensor:
        # oneDNN pads with code `zero_point`, i.e. with 0.0, as a float convolution does.
        codes = codes.contiguous(memory_format=torch.channels_last)
        packed = self.packed(codes.shape[2], codes.shape[3], zero_point)
        y = torch.ops.onednn.qconv2d_pointwise(
            codes, 1.0, zero_point, packed, self.w_scale, self.w_zero_point, None,
            self.stride, self.padding, self.dilation, self.groups, 1.0, 0, dtype, "none", [], "",
        )  # fmt: skip
        bias = self.bias.to(y.dtype).view(1, -1, 1, 1)
        return torch.addcmul(bias, y, step.to(y.dtype))

    def extra_repr(self) -> str:
        return f"{self.in_channels}, {self.out_channels}, stride={self.stride}, padding={self.padding}, int8"


def _int8_weights(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 codes of a weight per output channel (dim 0), and their float32 scales."""
    w = weight.detach().float().cpu()
    scale = w.abs().amax(dim=tuple(range(1, w.ndim)), keepdim=True).clamp_min(1e-12) / QMAX
    return torch.round(w / scale).clamp(-QMAX, QMAX).to(torch.int8), scale.flatten()


class Int8Linear(nn.Module):
    """A frozen 1×1 convolution run as oneDNN's u8×s8 matmul over the channels of each position
    (attention projections, skip convolutions): 2× the rate of the bf16 matmul here (≈1.8 vs
    ≈0.9 TOP/s at 2048×384×1152). Same scheme as Int8Conv2d but one activation step per token
    (a matmul keeps tokens apart, and per token is more accurate): exact integer sums, step and
    bias applied per element — batch-invariant."""

    def __init__(self, conv: nn.Conv2d) -> None:
        super().__init__()
        if conv.kernel_size != (1, 1) or conv.groups != 1:
            raise ValueError(f"Int8Linear replaces 1×1 convolutions, got {conv}")
        self.in_channels, self.out_channels = conv.in_channels, conv.out_channels
        qweight, self.w_scale = _int8_weights(conv.weight.flatten(1))
        self.w_zero_point = torch.zeros(self.out_channels, dtype=torch.int64)
        self.packed = torch.ops.onednn.qlinear_prepack(qweight, None)
        bias = conv.bias.detach() if conv.bias is not None else torch.zeros(self.out_channels)
        self.bias = bias.float().cpu()

    def project(self, tokens: torch.Tensor) -> torch.Tensor:
        """(N, …, C_in) → (N, …, C_out)."""
        codes, step = fused(quantise_tokens_eager, tokens)
        y = torch.ops.onednn.qlinear_pointwise(
            codes.reshape(-1, self.in_channels), 1.0, ZERO_POINT, self.packed, self.w_scale,
            self.w_zero_point, None, 1.0, 0, tokens.dtype, "none", [], "",
        ).view(*tokens.shape[:-1], self.out_channels)  # fmt: skip
        return torch.addcmul(self.bias.to(y.dtype), y, step.to(y.dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.project(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)

    def extra_repr(self) -> str:
        return f"{self.in_channels}, {self.out_channels}, 1×1, int8"


def quantise_convolutions(model: nn.Module, keep: tuple[nn.Module, ...] = ()) -> int:
    """Swap every nn.Conv2d of `model` with ≥ 16 input channels (except those in `keep`) for an
    Int8Conv2d, or an Int8Linear if it is 1×1, in place; return how many were swapped. Thin
    convolutions (the RGB-like input layer) gain nothing from int8 and lose the most precision."""
    swapped = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Conv2d) and child.in_channels >= 16 and not any(child is k for k in keep):
                pointwise = child.kernel_size == (1, 1) and child.groups == 1
                setattr(parent, name, Int8Linear(child) if pointwise else Int8Conv2d(child))
                swapped += 1
    return swapped


class NormThenInt8Conv(nn.Module):
    """`conv(norm(x, scale_shift))` with the norm's affine, FiLM and SiLU fused into the int8
    convolution's quantising pass: normalise, activate and quantise in one kernel, so the
    normalised map is never written. Takes the norm's place in a ResBlock; the conv's place
    becomes an identity."""

    def __init__(self, norm: NormAct, conv: Int8Conv2d) -> None:
        super().__init__()
        self.norm, self.conv = norm, conv

    def forward(
        self, x: torch.Tensor, scale_shift: tuple[torch.Tensor, torch.Tensor] | None = None
    ) -> torch.Tensor:
        return self.conv.forward_after_norm(self.norm, x, scale_shift)


def fuse_norms_into_int8_convs(block: ResBlock) -> None:
    """In a ResBlock, replace each norm → int8 conv pair with one NormThenInt8Conv, in place.
    The input pair of a resampling block is left alone: the resampling sits between them."""
    if isinstance(block.out_conv, Int8Conv2d):
        block.out_norm = NormThenInt8Conv(block.out_norm, block.out_conv)
        block.out_conv = nn.Identity()
    if isinstance(block.in_conv, Int8Conv2d) and not (block.up or block.down):
        block.in_norm = NormThenInt8Conv(block.in_norm, block.in_conv)
        block.in_conv = nn.Identity()
