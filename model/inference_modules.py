"""Batch-invariant drop-in modules that `prepare_for_inference` swaps into a UNet for sampling.

A sample must come out bit-identical whatever batch it is sampled in (the determinism
contract). oneDNN convolutions, attention and elementwise ops already are row-independent
on CPU; these replace the layers whose CPU kernels are not, and which training has no
reason to pay for. Each keeps the parameters (and so the checkpoint key names) of the
layer it replaces.
"""

from __future__ import annotations

from typing import TypeVar, cast

import torch
import torch.nn.functional as F
from torch import nn

from model.unet import NormAct, UNetModel


class RowwiseLinear(nn.Linear):
    """A linear layer applied one row at a time, so each row's result is independent of the batch.

    BLAS picks its kernel (and so its summation order) by the number of rows: gemv for
    one, blocked gemm for more. That made a sample's timestep embedding differ in the
    last bits with its batch size, which bf16 rounding then amplified over a sampling
    run. Costs N tiny matrix-vector products.
    """

    @classmethod
    def replacing(cls, layer: nn.Linear) -> RowwiseLinear:
        new = cls(layer.in_features, layer.out_features, bias=layer.bias is not None, device="meta")
        new.weight, new.bias = layer.weight, layer.bias
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] > 1:
            # A sampler step gives every row the same timestep: compute each distinct row once
            # (a row's result does not depend on its neighbours, so this changes no bit).
            rows, inverse = torch.unique(x, dim=0, return_inverse=True)
            if rows.shape[0] < x.shape[0]:
                return self(rows)[inverse]
        return torch.cat([F.linear(x[i : i + 1], self.weight, self.bias) for i in range(x.shape[0])])


def batch_invariant_group_norm(x: torch.Tensor, num_groups: int, eps: float) -> torch.Tensor:
    """Affine-free GroupNorm whose per-sample statistics do not depend on the batch.

    On a channels_last map of ≥ 1024 pixels the CPU kernel splits the N·H·W pixels of
    the whole batch evenly over its T threads and adds the per-thread partial sums, so
    a sample cut by a thread boundary gets a different summation order than the same
    sample in another batch. When N is a multiple of T every sample lies wholly in one
    thread, summed in the same order whatever the batch; so we pad the batch with zero
    rows up to a multiple of T.
    """
    n, threads = x.shape[0], torch.get_num_threads()
    pad = -n % threads
    needs_pad = (
        pad
        and x.device.type == "cpu"
        and x.shape[2] * x.shape[3] >= 1024
        and x.is_contiguous(memory_format=torch.channels_last)
    )
    if not needs_pad:
        return F.group_norm(x, num_groups, None, None, eps)
    # The zero rows are made channels_last directly: an NCHW block (or its .contiguous()
    # copy) costs a transposing pass, 0.5–1 ms per 64² map — most of batch 1's GroupNorm time.
    cl = torch.channels_last
    zeros = torch.empty((pad, *x.shape[1:]), dtype=x.dtype, device=x.device, memory_format=cl).zero_()
    padded = torch.cat([x, zeros])
    return F.group_norm(padded, num_groups, None, None, eps)[:n]


class BatchInvariantNormAct(NormAct):
    """NormAct with batch-invariant GroupNorm statistics and an in-place SiLU (no gradient needed)."""

    @classmethod
    def replacing(cls, layer: NormAct) -> BatchInvariantNormAct:
        new = cls(layer.norm.num_groups, layer.norm.num_channels, act=layer.act)
        new.norm = layer.norm
        return new

    def normalised(self, x: torch.Tensor) -> torch.Tensor:
        return batch_invariant_group_norm(x, self.norm.num_groups, self.norm.eps)

    def silu(self, h: torch.Tensor) -> torch.Tensor:
        return F.silu(h, inplace=True)


_ONEDNN = torch.backends.mkldnn.is_available()
_Conv = TypeVar("_Conv", bound=nn.Conv2d)


def _conv_like(cls: type[_Conv], conv: nn.Conv2d) -> _Conv:
    """A `cls` sharing `conv`'s parameters (and so its checkpoint key names)."""
    pair = tuple[int, int]
    new = cls(
        conv.in_channels, conv.out_channels, cast(pair, conv.kernel_size), stride=cast(pair, conv.stride),
        padding=cast(pair, conv.padding), dilation=cast(pair, conv.dilation), groups=conv.groups,
        bias=conv.bias is not None, padding_mode=conv.padding_mode, device="meta",
    )  # fmt: skip
    new.weight, new.bias = conv.weight, conv.bias
    return new


class PerSampleConv2d(nn.Conv2d):
    """A float32 convolution run one sample at a time.

    float32 convolution kernels are chosen by batch size (bf16 ones are not, here); the
    output head is a small share of the work, so it runs per sample.
    """

    @classmethod
    def replacing(cls, conv: nn.Conv2d) -> PerSampleConv2d:
        return _conv_like(cls, conv)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype != torch.float32:
            return super().forward(x)
        conv = super().forward
        return torch.cat([conv(x[i : i + 1]) for i in range(x.shape[0])])


class OneDnnConv2d(nn.Conv2d):
    """A convolution that, in float32 on CPU, always runs oneDNN's kernel.

    PyTorch sends a float32 convolution with fewer than 20480 input values per call (a
    sample alone on the 16² and 8² levels of a UNet) to its own im2col + gemm kernel, and
    larger batches of the same maps to oneDNN: the two sum in different orders, so on a CPU
    without native bf16 (where sampling runs in float32) a sample differed in its last bits
    with the size of its batch. oneDNN's kernel gives every row the same result whatever the
    batch. It costs a lone sample 5 % (the demo net in float32: 22.3 vs 21.1 ms a call, 2-core
    EPYC); batches of two or more ran oneDNN already.
    """

    @classmethod
    def replacing(cls, conv: nn.Conv2d) -> OneDnnConv2d:
        return _conv_like(cls, conv)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype != torch.float32 or x.device.type != "cpu" or self.padding_mode != "zeros" or not _ONEDNN:
            return super().forward(x)
        return torch.ops.aten.mkldnn_convolution(
            x, self.weight, self.bias, self.padding, self.stride, self.dilation, self.groups
        )


def make_batch_invariant(model: nn.Module) -> None:
    """Swap, in place, every linear layer for a RowwiseLinear, every NormAct for a
    BatchInvariantNormAct, a UNet's output head for a PerSampleConv2d and every other
    convolution for a OneDnnConv2d."""
    if isinstance(model, UNetModel) and type(model.out_conv) is nn.Conv2d:
        model.out_conv = PerSampleConv2d.replacing(model.out_conv)
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.Linear:
                setattr(parent, name, RowwiseLinear.replacing(child))
            elif type(child) is NormAct:
                setattr(parent, name, BatchInvariantNormAct.replacing(child))
            elif type(child) is nn.Conv2d:
                setattr(parent, name, OneDnnConv2d.replacing(child))
