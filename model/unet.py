"""The denoising UNet of the improved-DDPM family (Nichol & Dhariwal 2021; Ho et al. 2020).

Timestep embedding → MLP; residual blocks with GroupNorm + SiLU and scale-shift norm
(FiLM from the timestep embedding); self-attention at chosen feature-map sizes; a
middle block res-attn-res; skip connections concatenated on the way up; a
zero-initialised output convolution so the untrained net predicts ε = 0.

`forward(x, t)` takes `t` in the ORIGINAL 0..T-1 timestep scale (the diffusion's
`timestep_map` has already been applied by the caller).

This is the network as trained. For sampling, `model.inference.prepare_for_inference`
swaps in batch-invariant layers (model/inference_modules.py) and, opt-in, int8 ones
(model/quantize.py) with the same parameters.
"""

from __future__ import annotations

import math
from typing import TypeVar

import torch
import torch.nn.functional as F
from torch import nn

from model.config import ModelConfig

M = TypeVar("M", bound=nn.Module)


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of (possibly fractional) timesteps (Vaswani et al. 2017, §3.5)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


def param_dtype(module: nn.Module) -> torch.dtype:
    """The dtype of a module's (first) parameter: what its inputs must be cast to."""
    return next(module.parameters()).dtype


class Pointwise(nn.Conv2d):
    """A 1×1 convolution that also takes channels-last tokens (N, …, C), as a matmul.

    Attention runs its projections on tokens, and on a channels_last map the convolution
    itself runs as that matmul, which oneDNN runs far faster than a 1×1 convolution.
    """

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__(in_channels, out_channels, 1)

    def project(self, tokens: torch.Tensor) -> torch.Tensor:
        return F.linear(tokens, self.weight.flatten(1), self.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.is_contiguous(memory_format=torch.channels_last):
            return self.project(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        return super().forward(x)


def zero_module(module: M) -> M:
    """Zero a layer's parameters so that a residual branch starts as the identity."""
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


class NormAct(nn.Module):
    """GroupNorm, then an optional per-sample FiLM `(1 + scale), shift`, then optional SiLU.

    One module for the three ops so that they cost fewer passes over the feature map: the
    affine γ, β and the FiLM fold into one per-(sample, channel) multiply-add on the
    normalised map. The statistics are accumulated in float32 by the GroupNorm kernel for
    every activation dtype (as GroupNorm32 does in the reference code), so a bf16 copy of
    the net still normalises over 4096 pixels without losing digits.
    """

    def __init__(self, num_groups: int, channels: int, act: bool = True) -> None:
        super().__init__()
        self.norm = nn.GroupNorm(num_groups, channels)
        self.act = act

    def normalised(self, x: torch.Tensor) -> torch.Tensor:
        """The affine-free GroupNorm of `x`."""
        return F.group_norm(x, self.norm.num_groups, None, None, self.norm.eps)

    def silu(self, h: torch.Tensor) -> torch.Tensor:
        return F.silu(h)

    def coefficients(
        self, n: int, scale_shift: tuple[torch.Tensor, torch.Tensor] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Float32 (N, C) `w, b` with output = act(x̂·w + b): γ, β and the FiLM in one multiply-add."""
        gamma, beta = self.norm.weight.float(), self.norm.bias.float()
        if scale_shift is None:
            return gamma.expand(n, -1), beta.expand(n, -1)
        # γ·x̂·(1+s) + β·(1+s) + shift = x̂·w + b with per-(sample, channel) w, b.
        scale, shift = scale_shift
        return gamma * (1 + scale.float()), torch.addcmul(shift.float(), beta, 1 + scale.float())

    def forward(
        self, x: torch.Tensor, scale_shift: tuple[torch.Tensor, torch.Tensor] | None = None
    ) -> torch.Tensor:
        w, b = self.coefficients(x.shape[0], scale_shift)
        w4, b4 = w.to(x.dtype)[:, :, None, None], b.to(x.dtype)[:, :, None, None]
        h = torch.addcmul(b4, self.normalised(x), w4)
        return self.silu(h) if self.act else h


class Downsample(nn.Module):
    """Halve H and W with a stride-2 3×3 convolution."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.op = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)


class Upsample(nn.Module):
    """Double H and W (nearest neighbour), then a 3×3 convolution."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class ResBlock(nn.Module):
    """Residual block conditioned on the timestep embedding, optionally resampling (BigGAN-style)."""

    def __init__(
        self,
        channels: int,
        emb_channels: int,
        out_channels: int,
        *,
        dropout: float,
        num_groups: int,
        use_scale_shift_norm: bool,
        up: bool = False,
        down: bool = False,
    ) -> None:
        super().__init__()
        self.use_scale_shift_norm = use_scale_shift_norm
        self.up, self.down = up, down
        self.in_norm = NormAct(num_groups, channels)
        self.in_conv = nn.Conv2d(channels, out_channels, 3, padding=1)
        self.emb_proj = nn.Linear(emb_channels, 2 * out_channels if use_scale_shift_norm else out_channels)
        self.out_norm = NormAct(num_groups, out_channels)
        self.dropout = nn.Dropout(dropout)
        self.out_conv = zero_module(nn.Conv2d(out_channels, out_channels, 3, padding=1))
        self.skip: nn.Module = (
            nn.Identity() if out_channels == channels else Pointwise(channels, out_channels)
        )

    def _resample(self, x: torch.Tensor) -> torch.Tensor:
        if self.up:
            return F.interpolate(x, scale_factor=2.0, mode="nearest")
        if self.down:
            return F.avg_pool2d(x, 2)
        return x

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.in_norm(x)
        if self.up or self.down:
            # Resample after the norm but before the conv, as BigGAN's up/down blocks do.
            h, x = self._resample(h), self._resample(x)
        h = self.in_conv(h)
        emb_out = self.emb_proj(F.silu(emb).to(param_dtype(self.emb_proj))).to(h.dtype)
        if self.use_scale_shift_norm:
            scale, shift = emb_out.chunk(2, dim=1)
            h = self.out_norm(h, (scale, shift))
        else:
            h = self.out_norm(h + emb_out[:, :, None, None])
        return self.skip(x) + self.out_conv(self.dropout(h))


class AttentionBlock(nn.Module):
    """Multi-head self-attention over the H·W positions of a feature map, residual."""

    def __init__(self, channels: int, *, num_heads: int, num_head_channels: int, num_groups: int) -> None:
        super().__init__()
        if num_head_channels > 0:
            if channels % num_head_channels:
                raise ValueError(
                    f"{channels} channels are not divisible by num_head_channels {num_head_channels}"
                )
            num_heads = channels // num_head_channels
        if channels % num_heads:
            raise ValueError(f"{channels} channels are not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.norm = NormAct(num_groups, channels, act=False)
        self.qkv = Pointwise(channels, 3 * channels)
        self.proj_out = zero_module(Pointwise(channels, channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, hh, ww = x.shape
        heads, length = self.num_heads, hh * ww
        # Positions as tokens: (N, H·W, C) is a free view of a channels_last map, and the 1×1
        # convolutions become plain matmuls, which oneDNN runs far faster than 1×1 convs here.
        tokens = self.norm(x).permute(0, 2, 3, 1).reshape(n, length, c)
        qkv = self.qkv.project(tokens)
        q, k, v = qkv.view(n, length, 3, heads, c // heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v)  # (N, heads, H·W, C/heads)
        a = a.transpose(1, 2).reshape(n, length, c)
        out = self.proj_out.project(a)
        return x + out.view(n, hh, ww, c).permute(0, 3, 1, 2)


class TimestepSequential(nn.Sequential):
    """A sequence of layers where residual blocks also receive the timestep embedding."""

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        for layer in self:
            x = layer(x, emb) if isinstance(layer, ResBlock) else layer(x)
        return x


class UNetModel(nn.Module):
    """The improved-DDPM UNet; output = [ε, v] along channels when σ is learned."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        mc = cfg.model_channels
        emb_dim = 4 * mc
        self.time_embed = nn.Sequential(nn.Linear(mc, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))

        def res(ch_in: int, ch_out: int, **kw: bool) -> ResBlock:
            return ResBlock(
                ch_in,
                emb_dim,
                ch_out,
                dropout=cfg.dropout,
                num_groups=cfg.num_groups,
                use_scale_shift_norm=cfg.use_scale_shift_norm,
                **kw,
            )

        def attn(ch: int) -> AttentionBlock:
            return AttentionBlock(
                ch,
                num_heads=cfg.num_heads,
                num_head_channels=cfg.num_head_channels,
                num_groups=cfg.num_groups,
            )

        # `size` is the current feature-map side; attention where it is in attention_resolutions.
        size = cfg.image_size
        ch = mc
        self.input_blocks = nn.ModuleList([TimestepSequential(nn.Conv2d(cfg.in_channels, mc, 3, padding=1))])
        skip_chans = [ch]
        self.attention_sizes: list[int] = []
        for level, mult in enumerate(cfg.channel_mult):
            for _ in range(cfg.num_res_blocks):
                layers: list[nn.Module] = [res(ch, mult * mc)]
                ch = mult * mc
                if size in cfg.attention_resolutions:
                    layers.append(attn(ch))
                    self.attention_sizes.append(size)
                self.input_blocks.append(TimestepSequential(*layers))
                skip_chans.append(ch)
            if level != len(cfg.channel_mult) - 1:
                down = res(ch, ch, down=True) if cfg.resblock_updown else Downsample(ch)
                self.input_blocks.append(TimestepSequential(down))
                skip_chans.append(ch)
                size //= 2

        self.middle_block = TimestepSequential(res(ch, ch), attn(ch), res(ch, ch))
        self.attention_sizes.append(size)

        self.output_blocks = nn.ModuleList()
        for level, mult in reversed(list(enumerate(cfg.channel_mult))):
            for i in range(cfg.num_res_blocks + 1):
                layers = [res(ch + skip_chans.pop(), mult * mc)]
                ch = mult * mc
                if size in cfg.attention_resolutions:
                    layers.append(attn(ch))
                    self.attention_sizes.append(size)
                if level and i == cfg.num_res_blocks:
                    layers.append(res(ch, ch, up=True) if cfg.resblock_updown else Upsample(ch))
                    size *= 2
                self.output_blocks.append(TimestepSequential(*layers))

        self.out_norm = NormAct(cfg.num_groups, ch)
        self.out_conv = zero_module(nn.Conv2d(ch, cfg.out_channels, 3, padding=1))

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of the network body (the convolutions between the first and the head)."""
        return param_dtype(self.input_blocks[0])

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4 or x.shape[1] != self.cfg.in_channels:
            raise ValueError(f"expected x of shape (N, {self.cfg.in_channels}, H, W), got {tuple(x.shape)}")
        if t.ndim != 1 or t.shape[0] != x.shape[0]:
            raise ValueError(f"expected t of shape ({x.shape[0]},), got {tuple(t.shape)}")
        # Each part runs in its own parameters' dtype, so a reduced-precision copy of the
        # body can keep the cheap, precision-sensitive embedding MLP and head in float32.
        emb_in = timestep_embedding(t, self.cfg.model_channels)
        emb = self.time_embed(emb_in.to(param_dtype(self.time_embed)))
        h = x.to(self.dtype)
        skips = []
        for block in self.input_blocks:
            h = block(h, emb)
            skips.append(h)
        h = self.middle_block(h, emb)
        for block in self.output_blocks:
            h = block(torch.cat([h, skips.pop()], dim=1), emb)
        return self.out_conv(self.out_norm(h.to(param_dtype(self.out_conv))))
