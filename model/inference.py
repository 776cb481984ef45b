"""The optimised model function that samplers call: `prepare_for_inference(model, device)`.

What it does, and why (measured on a 2-core Zen 5 CPU, see benchmarks/RESULTS.md):
- weights of the convolutional body are converted to bf16 once (not autocast, which
  re-casts all weights on every call); the timestep MLP, its per-block projections, the
  norms and the output head stay float32 — they are a tiny share of the work and keep
  the output closest to the float32 net;
- channels_last activations, the layout oneDNN/cuDNN convolutions run natively;
- inference_mode, eval mode (dropout off);
- batch invariance: on CPU the kernels of the prepared net are row-independent (its
  GroupNorm batches are padded to a multiple of the thread count, its embedding matmuls
  and float32 head run per sample, its float32 convolutions always run oneDNN:
  model/inference_modules.py), so in bf16 and float32 channels_last a sample comes out
  bit-identical whatever its batch — measured, not assumed: see
  tests/model/test_unet.py. On CUDA, where cuDNN/cuBLAS pick kernels by shape, a fixed
  `micro_batch` (the net always sees exactly that many rows, the last chunk padded)
  gives the same guarantee at the cost of padding small batches.
- optional `torch.compile` (inductor, weight freezing); off by default because the
  compile takes minutes for the research-size nets and buys little on CPU, where the
  convolutions already dominate.
- opt-in precision "int8" (CPU with VNNI): the bf16 body with its convolutions and
  attention/skip projections in oneDNN int8, per-sample activation steps and the norm +
  SiLU + quantising fused by inductor (model/quantize.py) — ≈1.6× over bf16 for the 121 M
  nets, still batch-invariant, at a measured quality cost; its first call compiles the
  fused kernels (≈15 s cold, seconds with inductor's on-disk cache).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Literal

import torch
from torch import nn

from model.cpu_allocator import retain_freed_memory
from model.cpu_features import cpu_flags
from model.inference_modules import make_batch_invariant
from model.quantize import fuse_norms_into_int8_convs, int8_supported, quantise_convolutions
from model.unet import NormAct, ResBlock, UNetModel

Precision = Literal["auto", "fp32", "bf16", "fp16", "int8"]
PRECISIONS: tuple[str, ...] = ("auto", "fp32", "bf16", "fp16", "int8")
_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@functools.cache
def cpu_has_native_bf16() -> bool:
    """True when the CPU has bf16 dot-product instructions (AVX512-BF16 or AMX-BF16).

    Without them oneDNN emulates bf16 through float32 and the reduced precision buys
    nothing, so "auto" stays float32.
    """
    return bool(cpu_flags() & {"avx512_bf16", "amx_bf16"})


def resolve_precision(device: torch.device | str, precision: str = "auto") -> torch.dtype:
    """The compute dtype for the network body on `device`."""
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    dev = torch.device(device)
    if precision == "int8":
        if dev.type != "cpu":
            raise ValueError("int8 runs on CPU only (oneDNN VNNI kernels); use bf16 or fp16 on CUDA")
        if not int8_supported():
            raise ValueError("int8 needs a CPU with VNNI int8 dot products (AVX512-VNNI, AVX-VNNI or AMX)")
        # The int8 convolutions sit in the body that otherwise runs in the best float type.
        return torch.bfloat16 if cpu_has_native_bf16() else torch.float32
    if precision != "auto":
        dtype = _DTYPES[precision]
        if dev.type == "cpu" and dtype == torch.float16:
            raise ValueError("fp16 is not supported on CPU (no fast kernels); use bf16 or fp32")
        return dtype
    if dev.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if dev.type == "cpu" and cpu_has_native_bf16():
        return torch.bfloat16
    return torch.float32


def resolved_precision_name(device: torch.device | str, precision: str = "auto") -> str:
    """What `precision` resolves to on `device`, by name ("auto" → "bf16", say); raises like
    `resolve_precision`. Manifests record this, since samples are reproducible per precision."""
    dtype = resolve_precision(device, precision)
    if precision == "int8":
        return "int8"
    return next(name for name, d in _DTYPES.items() if d == dtype)


def differentiable_precision(device: torch.device | str, precision: str) -> str:
    """The precision name to sample in when the network must be differentiated (reconstruction
    guidance): `precision` resolved, except that int8 kernels have no gradient, so int8 becomes the
    float type its body runs in (what "auto" resolves to)."""
    name = resolved_precision_name(device, precision)
    return resolved_precision_name(device, "auto") if name == "int8" else name


def _keep_float32(model: nn.Module) -> list[nn.Module]:
    """The small, precision-sensitive parts that stay float32 in a reduced-precision body."""
    keep: list[nn.Module] = []
    for mod in model.modules():
        if isinstance(mod, NormAct):
            keep.append(mod.norm)
        elif isinstance(mod, ResBlock):
            keep.append(mod.emb_proj)
    if isinstance(model, UNetModel):
        keep += [model.time_embed, model.out_norm, model.out_conv]
    return keep


def _keep_unquantised(model: nn.Module) -> tuple[nn.Module, ...]:
    """Convolutions that stay in float under int8: the thin input layer and the head (most
    precision-sensitive)."""
    if isinstance(model, UNetModel):
        return (model.input_blocks[0][0], model.out_conv)  # type: ignore[index]
    return ()


def default_micro_batch(device: torch.device | str) -> int:
    """0 (whole batches) on CPU, whose kernels are batch-invariant; a fixed 8 rows on CUDA."""
    return 8 if torch.device(device).type == "cuda" else 0


class InferenceModel:
    """`model_fn(x_t, t) -> output` over a prepared network; float32 in, float32 out."""

    def __init__(
        self,
        net: nn.Module,
        device: torch.device,
        dtype: torch.dtype,
        micro_batch: int | None,
        forward: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
        channels_last: bool = True,
    ) -> None:
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.net = net
        self.device = device
        self.dtype = dtype
        self.micro_batch = micro_batch
        self._forward = forward

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4 or t.ndim != 1 or t.shape[0] != x.shape[0]:
            raise ValueError(f"expected x (N, C, H, W) and t (N,), got {tuple(x.shape)} and {tuple(t.shape)}")
        n = x.shape[0]
        k = self.micro_batch or n
        outs = []
        # An input that requires grad (reconstruction guidance, model.conditioning) gets a
        # differentiable call; every other call runs without autograd.
        with torch.inference_mode(not x.requires_grad):
            xd = x.to(self.device, torch.float32)
            td = t.to(self.device)
            for start in range(0, n, k):
                xc, tc = xd[start : start + k], td[start : start + k]
                rows = xc.shape[0]
                if self.micro_batch and rows < k:
                    # Pad with copies of the last row: same shapes → same kernels → batch-invariant.
                    xc = torch.cat([xc, xc[-1:].expand(k - rows, *xc.shape[1:])])
                    tc = torch.cat([tc, tc[-1:].expand(k - rows)])
                xc = xc.contiguous(memory_format=self.memory_format)
                outs.append(self._forward(xc, tc)[:rows].float())
            out = torch.cat(outs).contiguous()
        return out


def prepare_for_inference(
    model: nn.Module,
    device: torch.device | str = "cpu",
    *,
    precision: str = "auto",
    compile: bool = False,
    micro_batch: int | None = None,
    channels_last: bool = True,
) -> InferenceModel:
    """Convert `model` IN PLACE for fast sampling and return the model function.

    Pass a copy if the float32 module is still needed (the benchmark does). `micro_batch`
    > 0 fixes the network batch (see the module docstring); 0 runs whole batches.
    """
    dev = torch.device(device)
    dtype = resolve_precision(dev, precision)
    k = default_micro_batch(dev) if micro_batch is None else micro_batch
    if k < 0:
        raise ValueError(f"micro_batch must be ≥ 0, got {k}")
    if dev.type == "cpu":
        retain_freed_memory()
    model.eval().requires_grad_(False)
    make_batch_invariant(model)
    model.to(dev, dtype)
    for part in _keep_float32(model):
        part.float()
    if channels_last:
        model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    if precision == "int8":
        quantise_convolutions(model, keep=_keep_unquantised(model))
        for block in list(model.modules()):
            if isinstance(block, ResBlock):
                fuse_norms_into_int8_convs(block)
    forward: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = model
    if compile:
        # freezing folds the weights into the graph and lets inductor pre-pack them for oneDNN.
        forward = torch.compile(model, dynamic=False, options={"freezing": True})
    return InferenceModel(model, dev, dtype, k or None, forward, channels_last)
