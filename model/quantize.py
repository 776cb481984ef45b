"""int8 convolutions for CPU sampling: int8 weights per output channel, uint8 activations per sample.

Why: on a CPU with VNNI (AVX512-VNNI, AMX) oneDNN's u8×s8 convolution does twice the
multiply-adds per cycle of its bf16 one (measured on Zen 5: ≈2.0 vs ≈1.0 TOP/s), and the
3×3 convolutions are ≈80 % of a bf16 UNet forward.

How, and why it stays batch-invariant: each sample is quantised with its own scale
s_i = max|x_i| / 127 (symmetric, zero point 128), so a sample's codes do not depend on
its batch neighbours; the convolution accumulates the integer products exactly in
int32 and scales them by the per-channel weight scale; s_i and the bias are applied
afterwards, per element. No step mixes samples, so sample i is bit-identical whatever
the batch. Dynamic per-sample scales also follow the activations' range across
timesteps, which static calibrated scales would not (Q-Diffusion, Li et al. 2023).

Quantisation error is larger than bf16's (see benchmarks/RESULTS.md): this is the
"int8" precision, opt-in.
"""

from __future__ import annotations

import torch
from torch import nn

from model.cpu_features import cpu_flags

QMAX = 127  # symmetric codes -127..127 around the zero point
ZERO_POINT = 128


def cpu_has_vnni() -> bool:
    """True when oneDNN has native int8 dot products here (AVX512-VNNI, AVX-VNNI or AMX-INT8)."""
    return bool(cpu_flags() & {"avx512_vnni", "avx_vnni", "amx_int8"})


def int8_supported() -> bool:
    ops = torch.ops.onednn
    return torch.backends.mkldnn.is_available() and hasattr(ops, "qconv2d_pointwise") and cpu_has_vnni()


class Int8Conv2d(nn.Module):
    """A frozen nn.Conv2d whose forward runs oneDNN's int8 convolution (CPU, inference only)."""

    def __init__(self, conv: nn.Conv2d) -> None:
        super().__init__()
        w = conv.weight.detach().float().cpu()
        self.stride, self.padding = list(conv.stride), list(conv.padding)
        self.dilation, self.groups = list(conv.dilation), conv.groups
        if not isinstance(conv.padding, tuple):
            raise ValueError(f"padding {conv.padding!r} is not supported for int8")
        self.in_channels, self.out_channels = conv.in_channels, conv.out_channels
        self.w_scale = w.abs().amax(dim=(1, 2, 3)).clamp_min(1e-12) / QMAX
        qw = torch.round(w / self.w_scale[:, None, None, None]).clamp(-QMAX, QMAX).to(torch.int8)
        self.w_zero_point = torch.zeros(w.shape[0], dtype=torch.int64)
        self.qweight = qw
        self._packed: dict[tuple[int, int], torch.Tensor] = {}
        bias = conv.bias.detach() if conv.bias is not None else torch.zeros(w.shape[0])
        self.bias = bias.float().cpu()

    def packed(self, height: int, width: int) -> torch.Tensor:
        """The weights in oneDNN's blocked layout for this feature-map size (2.3× faster than a
        shape-agnostic packing on 8×8 maps); any batch size can use it, the arithmetic is exact."""
        key = (height, width)
        if key not in self._packed:
            # The input scale is 1: the per-sample scale is applied to the output instead.
            self._packed[key] = torch.ops.onednn.qconv_prepack(
                self.qweight, self.w_scale, 1.0, ZERO_POINT, self.stride, self.padding, self.dilation,
                self.groups, [1, self.in_channels, height, width],
            )
        return self._packed[key]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        # max|x| per sample; a channels_last map's (N, H·W·C) view is free.
        amax = x.abs().amax(dim=(1, 2, 3)).float().clamp_min(1e-12)
        scale = amax / QMAX
        # round(x / s) + 128 as truncation of x/s + 128.5 (always ≥ 1.5, so truncation rounds).
        q = x.float().mul_((1 / scale).view(n, 1, 1, 1)).add_(ZERO_POINT + 0.5).to(torch.uint8)
        q = q.contiguous(memory_format=torch.channels_last)
        y = torch.ops.onednn.qconv2d_pointwise(
            q, 1.0, ZERO_POINT, self.packed(*x.shape[2:]), self.w_scale, self.w_zero_point, None,
            self.stride, self.padding, self.dilation, self.groups,
            1.0, 0, x.dtype, "none", [], "",
        )  # fmt: skip
        bias = self.bias.to(y.dtype).view(1, -1, 1, 1)
        return torch.addcmul(bias, y, scale.to(y.dtype).view(n, 1, 1, 1))

    def extra_repr(self) -> str:
        return f"{self.in_channels}, {self.out_channels}, stride={self.stride}, padding={self.padding}, int8"


def quantise_convolutions(model: nn.Module, keep: tuple[nn.Module, ...] = ()) -> int:
    """Swap every nn.Conv2d of `model` with ≥ 16 input channels (except those in `keep`) for an
    Int8Conv2d, in place; return how many were swapped. Thin convolutions (the RGB-like input
    layer) gain nothing from int8 and lose the most precision."""
    swapped = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Conv2d) and child.in_channels >= 16 and not any(child is k for k in keep):
                setattr(parent, name, Int8Conv2d(child))
                swapped += 1
    return swapped
