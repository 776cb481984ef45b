"""Training-step throughput and peak memory: eager fp32 vs the optimised recipe, in one run.

    python -m benchmarks.training [--quick] [--sizes 64,128] [--batch 4] [--compile]
                                  [--reference /path/to/improved-diffusion]

Model: the research 2-channel config of openai/improved-diffusion (128 base channels,
3 res blocks, attention at 16 and 8 px, 4 heads; 121 M parameters at 64²), hybrid
loss, learned σ, T = 1000. One "step" is what training/train.py does per optimiser
step: micro-batched forward + backward (accumulate_gradients), grad clipping, AdamW,
EMA update. The variants' steps are timed interleaved in one process (a load change on
the shared CPU hits both alike); peak memory is measured in a fresh process per variant.

With --reference, openai/improved-diffusion's own training step (its UNetModel and
GaussianDiffusion.training_losses with learned σ, AdamW, its update_ema), imported from a
local checkout (never copied), is timed interleaved with ours: the yardstick we compare against.
Without it, fixed figures for improved-diffusion stand in (0.67 images/s at 64², batch 4,
and 0.20 at 128², measured on another 2-core CPU), so only a run with --reference compares
like with like. Absolute numbers on a shared CPU are noisy; the ratios are measured back to
back in one run.
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

REFERENCE_IMAGES_PER_S = {64: 0.67, 128: 0.20}  # improved-diffusion, another 2-core CPU, batch 4


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


class ReferenceTrainer:
    """openai/improved-diffusion's training step, from a local checkout: the yardstick we compare against.

    What its TrainLoop does per step on one process without fp16: training_losses with
    uniform t, mean loss, backward, AdamW (lr 1e-4, no weight decay), update_ema (0.9999).
    Its per-step grad-norm logging is left out, which only flatters it.
    """

    def __init__(self, checkout: str, size: int, global_batch: int) -> None:
        import torch

        sys.path.insert(0, checkout)
        from improved_diffusion.nn import update_ema
        from improved_diffusion.script_util import create_gaussian_diffusion
        from improved_diffusion.unet import UNetModel as ReferenceUNet

        cfg = model_config(size)
        torch.manual_seed(0)
        self.model = ReferenceUNet(
            in_channels=cfg.in_channels, model_channels=cfg.model_channels, out_channels=cfg.out_channels,
            num_res_blocks=cfg.num_res_blocks,
            attention_resolutions=tuple(size // r for r in cfg.attention_resolutions),  # by downsampling
            dropout=0.0, channel_mult=cfg.channel_mult, num_heads=cfg.num_heads, use_scale_shift_norm=True,
        )
        self.diffusion = create_gaussian_diffusion(steps=1000, learn_sigma=True, noise_schedule="linear")
        self.ema_params = [p.detach().clone() for p in self.model.parameters()]
        self.update_ema = update_ema
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=1e-4, weight_decay=0.0)
        self.global_batch = global_batch
        self.x_start = torch.rand(global_batch, 2, size, size) * 2 - 1

    def step(self, k: int) -> float:
        import torch

        g = torch.Generator().manual_seed(k)
        t0 = time.perf_counter()
        t = torch.randint(0, 1000, (self.global_batch,), generator=g)
        loss = self.diffusion.training_losses(self.model, self.x_start, t)["loss"].mean()
        self.opt.zero_grad()
        loss.backward()
        self.opt.step()
        self.update_ema(self.ema_params, list(self.model.parameters()), rate=0.9999)
        return time.perf_counter() - t0


class Trainer:
    """One variant's model, optimiser and EMA; `step(k)` is one optimiser step of train.py."""

    def __init__(self, variant: Variant, size: int, global_batch: int, micro_batch: int) -> None:
        import torch

        from model.config import DiffusionConfig
        from model.cpu_allocator import retain_freed_memory
        from model.diffusion import GaussianDiffusion
        from model.unet import UNetModel
        from training.ema import EMA

        torch.manual_seed(0)
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        if self.device.type == "cpu":
            retain_freed_memory()  # as training/train.py does; the reference in this process gains too
        self.fmt = torch.channels_last if variant.channels_last else torch.contiguous_format
        model = UNetModel(model_config(size)).to(self.device)
        self.model = model.to(memory_format=self.fmt)  # type: ignore[call-overload]
        self.diffusion = GaussianDiffusion.from_config(DiffusionConfig(loss="hybrid", learn_sigma=True))
        self.ema = EMA(self.model, 0.9999)
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=1e-4, fused=variant.fused_adam,
                                     foreach=None if variant.fused_adam else True)
        self.net = torch.compile(self.model) if variant.compile else self.model
        self.dtype = torch.bfloat16 if variant.precision == "bf16" else None
        self.size, self.global_batch, self.micro_batch = size, global_batch, micro_batch
        self.x_start = torch.rand(global_batch, 2, size, size, device=self.device) * 2 - 1

    def step(self, k: int) -> float:
        import contextlib

        import torch

        from training.train import accumulate_gradients, draw_t_noise

        def model_fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            out: torch.Tensor = self.net(x.contiguous(memory_format=self.fmt), t)
            return out.float()

        def autocast() -> contextlib.AbstractContextManager[Any]:
            if self.dtype is None:
                return contextlib.nullcontext()
            return torch.autocast(self.device.type, dtype=self.dtype)

        t0 = time.perf_counter()
        gb, shape = self.global_batch, (2, self.size, self.size)
        t, noise = draw_t_noise(range(k * gb, (k + 1) * gb), shape, 1000, 0)
        accumulate_gradients(model_fn, self.diffusion, self.x_start, t.to(self.device), noise.to(self.device),
                             self.micro_batch, autocast=autocast)
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        self.ema.update(self.model)
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0


def time_interleaved(variants: list[Variant], size: int, batch: int, steps: int, warmup: int,
                     reference: str | None = None) -> list[float]:
    """Best images/s of each variant (then the reference), steps alternating so load changes hit all alike."""
    trainers: list[Trainer | ReferenceTrainer] = [Trainer(v, size, batch, batch) for v in variants]
    if reference:
        trainers.append(ReferenceTrainer(reference, size, batch))
    for k in range(warmup):
        for tr in trainers:
            tr.step(k)
    best = [float("inf")] * len(trainers)
    for k in range(warmup, warmup + steps):
        for i, tr in enumerate(trainers):
            best[i] = min(best[i], tr.step(k))
    return [batch / b for b in best]


def peak_memory(variant: Variant, size: int, global_batch: int, micro_batch: int) -> dict[str, Any]:
    """Peak memory over one warm-up and one timed optimiser step (own process: its own peak)."""
    import torch

    tr = Trainer(variant, size, global_batch, micro_batch)
    tr.step(0)
    cuda = tr.device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    seconds = tr.step(1)
    peak = (torch.cuda.max_memory_allocated() if cuda
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    return {"peak_mib": peak / 2**20, "images_per_s": global_batch / seconds}


def run_child(job: dict[str, Any]) -> Any:
    proc = subprocess.run([sys.executable, "-m", "benchmarks.training", "--child", json.dumps(job)],
                          capture_output=True, text=True, env=os.environ.copy())
    if proc.returncode != 0:
        raise SystemExit(f"benchmark child failed ({job}):\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def child(job: dict[str, Any]) -> Any:
    if job["kind"] == "time":
        return time_interleaved([Variant(**v) for v in job["variants"]], job["size"], job["batch"],
                                job["steps"], job["warmup"], job.get("reference"))
    return peak_memory(Variant(**job["variant"]), job["size"], job["global_batch"], job["micro_batch"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="64² only, fewer steps, smaller memory sweep")
    parser.add_argument("--sizes", default="64,128")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per measurement")
    parser.add_argument("--compile", action="store_true", help="add torch.compile to the optimised variant")
    parser.add_argument("--reference", help="improved-diffusion checkout to time side by side")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return 0

    optimised = replace(OPTIMISED, compile=args.compile,
                        name="optimised+compile" if args.compile else "optimised")
    sizes = [64] if args.quick else [int(s) for s in args.sizes.split(",")]
    steps, warmup = (2, 1) if args.quick else (args.steps, 1)
    import torch

    print(f"training step (micro-batched fwd+bwd, clip, AdamW, EMA), batch {args.batch}, hybrid loss, "
          f"research 2-channel config (121 M params at 64²), {torch.get_num_threads()} threads; "
          f"best of {steps} interleaved steps after {warmup} warm-up; memory: own process per variant")
    print(f"{'size':>5} {'variant':<18} {'images/s':>9} {'peak MiB':>9} {'vs eager':>9} "
          f"{'vs improved-diffusion':>22}")
    for size in sizes:
        speeds = run_child({"kind": "time", "variants": [EAGER.__dict__, optimised.__dict__], "size": size,
                            "batch": args.batch, "steps": steps, "warmup": warmup,
                            "reference": args.reference})
        if args.reference:
            ref, ref_name = speeds[-1], "measured in this run"
            print(f"{size:>4}² {'improved-diffusion':<18} {ref:9.3f} {'-':>9} {ref / speeds[0]:8.2f}× "
                  f"{'1.00×':>22}", flush=True)
        else:
            ref, ref_name = REFERENCE_IMAGES_PER_S[size], "measured earlier on another 2-core CPU"
        for v, ips in zip((EAGER, optimised), speeds, strict=False):
            mem = run_child({"kind": "memory", "variant": v.__dict__, "size": size,
                             "global_batch": args.batch, "micro_batch": args.batch})
            print(f"{size:>4}² {v.name:<18} {ips:9.3f} {mem['peak_mib']:9.0f} {ips / speeds[0]:8.2f}× "
                  f"{f'{ips / ref:6.2f}×':>22}", flush=True)
        print(f"      (improved-diffusion: {ref:.3f} images/s, {ref_name})")

    print("\nmicro-batching: peak memory as the global batch grows (micro-batch 4, 64², optimised)")
    print(f"{'global':>6} {'micro':>5} {'images/s':>9} {'peak MiB':>9}")
    for gb in (4, 8) if args.quick else (4, 8, 16):
        r = run_child({"kind": "memory", "variant": optimised.__dict__, "size": 64, "global_batch": gb,
                       "micro_batch": 4})
        print(f"{gb:>6} {4:>5} {r['images_per_s']:9.3f} {r['peak_mib']:9.0f}", flush=True)
    print("(peak memory = process RSS on CPU (weights, grads, AdamW, EMA, activations of one micro-batch), "
          "peak allocated on CUDA)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
