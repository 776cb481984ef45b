"""Training-step throughput and peak memory: eager fp32 vs the optimised recipe, in one run.

    python -m benchmarks.training [--quick] [--sizes 64,128] [--batch 4] [--compile]

Model: the issue's 2-channel config of openai/improved-diffusion (128 base channels,
3 res blocks, attention at 16 and 8 px, 4 heads; 121 M parameters at 64²), hybrid
loss, learned σ, T = 1000. One "step" is what training/train.py does per optimiser
step: micro-batched forward + backward (accumulate_gradients), grad clipping, AdamW,
EMA update. Each (variant, size) runs in its own subprocess so its peak RSS is its own.

The reference numbers (openai/improved-diffusion on the issue author's 2-core CPU):
0.67 images/s at 64², batch 4, and 0.20 at 128². The CPU here is shared with other
jobs, so absolute numbers are noisy; the ratios are measured back to back in one run.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from dataclasses import dataclass, replace
from typing import Any

REFERENCE_IMAGES_PER_S = {64: 0.67, 128: 0.20}  # improved-diffusion, 2 CPU cores, batch 4


@dataclass(frozen=True)
class Variant:
    name: str
    precision: str  # fp32 | bf16
    channels_last: bool
    fused_adam: bool
    compile: bool


EAGER = Variant("eager fp32", "fp32", channels_last=False, fused_adam=False, compile=False)
OPTIMISED = Variant("optimised", "bf16", channels_last=True, fused_adam=True, compile=False)


def model_config(size: int) -> Any:
    from model.config import ModelConfig

    mult = {64: (1, 2, 3, 4), 128: (1, 1, 2, 3, 4)}[size]
    return ModelConfig(image_size=size, in_channels=2, out_channels=4, model_channels=128, channel_mult=mult,
                       num_res_blocks=3, attention_resolutions=(16, 8), num_heads=4)


def measure(
    variant: Variant, size: int, global_batch: int, micro_batch: int, steps: int, warmup: int
) -> dict[str, Any]:
    """Time `steps` optimiser steps after `warmup` ones; runs inside a fresh subprocess."""
    import contextlib

    import torch

    from model.config import DiffusionConfig
    from model.diffusion import GaussianDiffusion
    from model.unet import UNetModel
    from training.ema import EMA
    from training.train import accumulate_gradients, draw_t_noise

    torch.manual_seed(0)
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    fmt = torch.channels_last if variant.channels_last else torch.contiguous_format
    model = UNetModel(model_config(size)).to(device).to(memory_format=fmt)  # type: ignore[call-overload]
    diffusion = GaussianDiffusion.from_config(DiffusionConfig(loss="hybrid", learn_sigma=True))
    ema = EMA(model, 0.9999)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=variant.fused_adam,
                            foreach=None if variant.fused_adam else True)
    net = torch.compile(model) if variant.compile else model
    dtype = torch.bfloat16 if variant.precision == "bf16" else None

    def model_fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return net(x.contiguous(memory_format=fmt), t).float()

    def autocast() -> contextlib.AbstractContextManager[Any]:
        return torch.autocast(device.type, dtype=dtype) if dtype else contextlib.nullcontext()

    x_start = torch.rand(global_batch, 2, size, size, device=device) * 2 - 1

    def step(k: int) -> None:
        t, noise = draw_t_noise(range(k * global_batch, (k + 1) * global_batch), (2, size, size), 1000, 0)
        accumulate_gradients(model_fn, diffusion, x_start, t.to(device), noise.to(device), micro_batch,
                             autocast=autocast)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        ema.update(model)

    for k in range(warmup):
        step(k)
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times = []
    for k in range(warmup, warmup + steps):
        t0 = time.perf_counter()
        step(k)
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    best = min(times)  # the least-disturbed step: other jobs share this CPU
    peak = (torch.cuda.max_memory_allocated() if cuda
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    return {"variant": variant.name, "size": size, "global_batch": global_batch, "micro_batch": micro_batch,
            "images_per_s": global_batch / best,
            "median_images_per_s": global_batch / sorted(times)[len(times) // 2],
            "peak_mib": peak / 2**20, "memory": "cuda allocated" if cuda else "process RSS",
            "device": device.type, "threads": torch.get_num_threads()}


def run_child(
    variant: Variant, size: int, global_batch: int, micro_batch: int, steps: int, warmup: int
) -> dict[str, Any]:
    job = json.dumps({"variant": variant.__dict__, "size": size, "global_batch": global_batch,
                      "micro_batch": micro_batch, "steps": steps, "warmup": warmup})
    proc = subprocess.run([sys.executable, "-m", "benchmarks.training", "--child", job],
                          capture_output=True, text=True, env=os.environ.copy())
    if proc.returncode != 0:
        raise SystemExit(f"benchmark child failed ({variant.name}, {size}²):\n{proc.stderr[-2000:]}")
    result: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="64² only, fewer steps, smaller memory sweep")
    parser.add_argument("--sizes", default="64,128")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per measurement")
    parser.add_argument("--compile", action="store_true", help="add torch.compile to the optimised variant")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        job = json.loads(args.child)
        print(json.dumps(measure(Variant(**job.pop("variant")), **job)))
        return 0

    optimised = replace(OPTIMISED, compile=args.compile,
                        name="optimised+compile" if args.compile else "optimised")
    sizes = [64] if args.quick else [int(s) for s in args.sizes.split(",")]
    steps, warmup = (2, 1) if args.quick else (args.steps, 1)
    print(f"training step, {args.batch} images/step, hybrid loss, issue config (121 M params at 64²); "
          f"best of {steps} timed steps after {warmup} warm-up")
    print(f"{'size':>5} {'variant':<18} {'images/s':>9} {'peak MiB':>9} {'vs eager':>9} {'vs ref':>7}")
    for size in sizes:
        base = run_child(EAGER, size, args.batch, args.batch, steps, warmup)
        fast = run_child(optimised, size, args.batch, args.batch, steps, warmup)
        ref = REFERENCE_IMAGES_PER_S.get(size)
        for r in (base, fast):
            vs_ref = f"{r['images_per_s'] / ref:6.2f}×" if ref else "     -"
            print(f"{size:>4}² {r['variant']:<18} {r['images_per_s']:9.3f} {r['peak_mib']:9.0f} "
                  f"{r['images_per_s'] / base['images_per_s']:8.2f}× {vs_ref}", flush=True)

    print("\nmicro-batching: peak memory as the global batch grows (micro-batch 4, 64², optimised)")
    print(f"{'global':>6} {'micro':>5} {'images/s':>9} {'peak MiB':>9}")
    for gb in (4, 8) if args.quick else (4, 8, 16):
        r = run_child(optimised, 64, gb, 4, 1, 1)
        print(f"{gb:>6} {4:>5} {r['images_per_s']:9.3f} {r['peak_mib']:9.0f}", flush=True)
    print("(memory is peak process RSS on CPU, peak allocated on CUDA; includes weights, grads, AdamW, EMA)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
