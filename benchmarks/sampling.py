"""Sampling-speed benchmark: plain eager float32 UNet vs the optimised default path.

    python -m benchmarks.sampling [--quick] [--device cpu|cuda] [--sizes 64,128] [--batches 1,8,32]
                                  [--reference /path/to/improved-diffusion] [--compile] [--int8]

For the research 2-channel architecture (128 base channels, 3 res blocks, attention at
16² and 8², 4 heads, learned σ; channel_mult (1,2,3,4) at 64² = 121 M parameters and
(1,1,2,3,4) at 128²) it prints, per image size and batch size, images·steps/s (one
step = one network evaluation on the whole batch, what a sampler step costs) and the
peak memory of one step, for:
- `eager`: the unmodified UNetModel, float32, NCHW, torch.no_grad — the baseline;
- `optimised`: `model.inference.prepare_for_inference(model, device)` defaults;
- `int8` (only with --int8): the same with precision="int8" (opt-in; CPUs with VNNI);
- `reference` (only with --reference): openai/improved-diffusion's own UNetModel,
  imported from a local checkout, float32 eager — the yardstick we compare against.
Paths are timed in interleaved rounds (eager, optimised, eager, …) and the ratio is the
median of per-round ratios, so load from other processes on a shared CPU hits both
sides alike. Absolute numbers on a shared machine are noisy; the ratios much less so.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import ctypes
import gc
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from torch import nn

from model.config import ModelConfig
from model.inference import prepare_for_inference
from model.unet import UNetModel

ModelFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

# openai/improved-diffusion's 64² architecture with 2 channels (T1CE + mask): 121 M parameters.
RESEARCH_2CH_64 = ModelConfig(
    image_size=64,
    in_channels=2,
    out_channels=4,
    model_channels=128,
    channel_mult=(1, 2, 3, 4),
    num_res_blocks=3,
    attention_resolutions=(16, 8),
    num_heads=4,
)
RESEARCH_2CH_128 = replace(RESEARCH_2CH_64, image_size=128, channel_mult=(1, 1, 2, 3, 4))
CONFIGS = {64: RESEARCH_2CH_64, 128: RESEARCH_2CH_128}


def randomise_zero_layers(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give zero-initialised layers small random weights, so outputs (and errors) are non-trivial."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if not p.any():
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)
    return model


# ---------------------------------------------------------------------------
# Peak memory of one call.


class PeakMemory:
    """Peak memory of a code block above what was resident before it (bytes)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._libc = None
        if device.type == "cpu":
            with contextlib.suppress(OSError):
                self._libc = ctypes.CDLL("libc.so.6")

    @staticmethod
    def _status_kb(key: str) -> int:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
        raise KeyError(key)

    @contextlib.contextmanager
    def measure(self) -> Iterator[dict[str, float]]:
        result: dict[str, float] = {}
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats(self.device)
            before = torch.cuda.memory_allocated(self.device)
            yield result
            torch.cuda.synchronize()
            result["peak"] = float(torch.cuda.max_memory_allocated(self.device) - before)
            return
        # CPU: return freed heap pages to the OS, reset the kernel's RSS high-water mark
        # (VmHWM, via clear_refs) and read it back after the block.
        if self._libc is not None:
            self._libc.malloc_trim(0)
        Path("/proc/self/clear_refs").write_text("5")
        before = self._status_kb("VmRSS")
        yield result
        result["peak"] = float(self._status_kb("VmHWM") - before) * 1024


# ---------------------------------------------------------------------------
# Paths.


def eager_path(model: nn.Module) -> ModelFn:
    """The plain baseline: float32, NCHW, eval, no_grad — nothing else."""
    model.eval()

    def fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return model(x, t)

    return fn


def reference_path(checkout: Path, cfg: ModelConfig) -> ModelFn:
    """openai/improved-diffusion's UNetModel from a local checkout, float32 eager."""
    sys.path.insert(0, str(checkout))
    from improved_diffusion.unet import UNetModel as ReferenceUNet

    net = ReferenceUNet(
        in_channels=cfg.in_channels,
        model_channels=cfg.model_channels,
        out_channels=cfg.out_channels,
        num_res_blocks=cfg.num_res_blocks,
        # The reference names attention places by downsampling factor, not size.
        attention_resolutions=tuple(cfg.image_size // r for r in cfg.attention_resolutions),
        dropout=0.0,
        channel_mult=cfg.channel_mult,
        num_heads=cfg.num_heads,
        use_scale_shift_norm=cfg.use_scale_shift_norm,
    )
    return eager_path(randomise_zero_layers(net))


@dataclass
class Timing:
    seconds: list[float] = field(default_factory=list)
    peak: float = 0.0


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def bench_batch(
    paths: dict[str, ModelFn], cfg: ModelConfig, batch: int, rounds: int, device: torch.device
) -> dict[str, Timing]:
    g = torch.Generator().manual_seed(batch)
    x = torch.randn(batch, cfg.in_channels, cfg.image_size, cfg.image_size, generator=g)
    # One timestep for the whole batch, as in every sampler step.
    t = torch.full((batch,), int(torch.randint(0, 1000, (1,), generator=g)))
    xd, td = x.to(device), t.to(device)
    mem = PeakMemory(device)
    out: dict[str, Timing] = {}
    for name, fn in paths.items():
        timing = out[name] = Timing()
        with mem.measure() as m:  # the first call doubles as warm-up
            fn(xd, td)
            _sync(device)
        timing.peak = m["peak"]
    for _ in range(rounds):
        for name, fn in paths.items():
            _sync(device)
            t0 = time.perf_counter()
            fn(xd, td)
            _sync(device)
            out[name].seconds.append(time.perf_counter() - t0)
    return out


def output_errors(
    paths: dict[str, ModelFn], cfg: ModelConfig, device: torch.device, names: list[str]
) -> dict[str, float]:
    """Max |paths[name] − eager| over a batch of 4, relative to the eager output's range."""
    g = torch.Generator().manual_seed(7)
    x = torch.randn(4, cfg.in_channels, cfg.image_size, cfg.image_size, generator=g).to(device)
    t = torch.tensor([0, 300, 600, 999], device=device)
    ref = paths["eager"](x, t).float()
    span = ref.max() - ref.min()
    return {name: float((paths[name](x, t).float() - ref).abs().max() / span) for name in names}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    p.add_argument("--quick", action="store_true", help="2 timed rounds instead of 5")
    p.add_argument("--sizes", default="64,128", help="image sizes, from 64,128 (default both)")
    p.add_argument("--batches", default="1,8,32", help="batch sizes (default 1,8,32)")
    p.add_argument("--precision", default="auto", help="optimised path precision (auto|fp32|bf16|fp16)")
    p.add_argument("--micro-batch", type=int, default=None, help="optimised path micro-batch (default: auto)")
    p.add_argument("--compile", action="store_true", help="torch.compile the optimised path (slow to start)")
    p.add_argument("--int8", action="store_true", help="also time the opt-in int8 path (CPU with VNNI)")
    p.add_argument("--reference", type=Path, default=None, help="improved-diffusion checkout to compare with")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = p.parse_args(argv)

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda but no CUDA device is available")
    if args.threads:
        torch.set_num_threads(args.threads)
    sizes = [int(s) for s in args.sizes.split(",")]
    if not set(sizes) <= set(CONFIGS):
        p.error(f"--sizes must be from {sorted(CONFIGS)}")
    batches = [int(b) for b in args.batches.split(",")]
    rounds = 2 if args.quick else 5

    print(f"torch {torch.__version__}, device {device}, threads {torch.get_num_threads()}, rounds {rounds}")
    for size in sizes:
        cfg = CONFIGS[size]
        torch.manual_seed(0)
        base = randomise_zero_layers(UNetModel(cfg)).to(device)
        n_params = sum(q.numel() for q in base.parameters())
        opt = prepare_for_inference(
            copy.deepcopy(base),
            device,
            precision=args.precision,
            compile=args.compile,
            micro_batch=args.micro_batch,
        )
        paths: dict[str, ModelFn] = {"eager": eager_path(base), "optimised": opt}
        if args.int8:
            paths["int8"] = prepare_for_inference(copy.deepcopy(base), device, precision="int8")
        if args.reference is not None:
            paths["reference"] = reference_path(args.reference, cfg)
        fast = [n for n in ("optimised", "int8") if n in paths]
        err = output_errors(paths, cfg, device, fast)
        print(
            f"\n{size}²  channel_mult {cfg.channel_mult}  {n_params / 1e6:.1f} M params  optimised: "
            f"{str(opt.dtype).removeprefix('torch.')}, micro-batch {opt.micro_batch or 'off'}"
            f"{', compiled' if args.compile else ''}; max |opt − eager| = {err['optimised']:.1e} "
            "of the output range"
            + (f"; max |int8 − eager| = {err['int8']:.1e}" if args.int8 else "")
        )
        slow = [n for n in ("eager", "reference") if n in paths]
        header = f"{'batch':>5}  " + "  ".join(f"{n + ' img·st/s':>22} {'peak MiB':>8}" for n in paths)
        print(header + "".join(f"   {a[:3]}/{b[:3]}" for a in fast for b in slow))
        for batch in batches:
            res = bench_batch(paths, cfg, batch, rounds, device)
            cols = []
            for name in paths:
                s, mib = res[name].seconds, res[name].peak / 2**20
                cols.append(f"{batch / statistics.median(s):>12.2f} (best {batch / min(s):5.2f}) {mib:8.0f}")
            line = f"{batch:>5}  " + "  ".join(cols)
            for a in fast:
                for b in slow:
                    ratios = [sb / sa for sa, sb in zip(res[a].seconds, res[b].seconds, strict=True)]
                    line += f"   {statistics.median(ratios):6.2f}×"
            print(line, flush=True)
        del base, opt, paths
        gc.collect()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
