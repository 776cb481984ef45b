"""GPU check: one command that exercises everything CUDA-specific and writes its figures to JSON.

    python -m benchmarks.gpu_check [--out gpu_check.json] [--reference /path/to/improved-diffusion]
    python -m benchmarks.gpu_check --smoke      # tiny sizes; on a machine without CUDA it runs
                                                # the CPU-capable checks and says what it skipped

Checks (each recorded as {"status": "ran" | "failed" | "skipped", "reason", figures}):
- `precision_bf16`, `precision_fp16`: CUDA sampling in that precision; a sample is bit-identical
  whatever its batch (batch 8 vs batches of 3), and finite.
- `throughput_64`, `throughput_128`, `throughput_256`: DPM-Solver++ 25 steps on a batch of 32,
  seconds per sample, for our optimised UNet (`prepare_for_inference`, default precision) and
  openai/improved-diffusion's own UNet (float32 eager, from a local checkout: --reference or
  $IMPROVED_DIFFUSION; skipped with a message if absent). 64²/128²: the 121 M/125 M configs of
  benchmarks/sampling.py; 256²: the research config (128 channels, 2 res blocks, attention at 16,
  channel_mult 1,1,2,2,4,4). Goal: ≤ 0.2 s per 256² sample on a current data-centre GPU.
- `ddp_nccl`: a few DDP training steps of the tiny preset under torchrun with NCCL (one rank per
  visible GPU); gloo on CPU in --smoke.
- `stack_job`: one job through the real stack (Redis, a worker with SYNTHMRI_DEVICE=cuda, the
  API); the manifest must say the device it ran on.
Budget: under 8 minutes on one GPU. Prints a summary; the exit code is 1 if a check failed.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from synthmri.localstack import REPO_ROOT

Result = dict[str, Any]
STEPS = 25
BATCH = 32


def cuda() -> bool:
    return torch.cuda.is_available()


def skipped(reason: str) -> Result:
    return {"status": "skipped", "reason": reason}


# -- precision and batch invariance ----------------------------------------------------------
def check_precision(precision: str, smoke: bool) -> Result:
    if not cuda():
        return skipped("no CUDA device")
    from model.checkpoint import load_checkpoint
    from model.generate import generate
    from tests.conftest import build_tiny_checkpoint

    with tempfile.TemporaryDirectory() as tmp:
        build_tiny_checkpoint(Path(tmp) / "tiny")
        ckpt = load_checkpoint(Path(tmp) / "tiny")
    kw = dict(seed=7, indices=range(8), sampler="dpm++sde", steps=4 if smoke else 10, device="cuda",
              precision=precision)  # fmt: skip
    whole = generate(ckpt, batch_size=8, **kw)  # type: ignore[arg-type]
    split = generate(ckpt, batch_size=3, **kw)  # type: ignore[arg-type]
    identical = bool((whole == split).all())
    finite = bool(torch.isfinite(torch.from_numpy(whole)).all())
    ok = identical and finite
    why = {} if ok else {"reason": "samples differ between batch 8 and batches of 3, or are not finite"}
    return {"status": "ran" if ok else "failed", "batch_invariant": identical, "finite": finite, **why}


# -- throughput ---------------------------------------------------------------------------------
def research_config() -> Any:
    from benchmarks.sampling import RESEARCH_2CH_64

    return replace(RESEARCH_2CH_64, image_size=256, channel_mult=(1, 1, 2, 2, 4, 4), num_res_blocks=2,
                   attention_resolutions=(16,))  # fmt: skip


def configs(smoke: bool) -> dict[int, Any]:
    from benchmarks.sampling import CONFIGS

    cfgs = {**CONFIGS, 256: research_config()}
    if smoke:  # the same code with a small net and small images
        cfgs = {s: replace(c, image_size=16, model_channels=32, channel_mult=(1, 2), num_res_blocks=1,
                           attention_resolutions=(8,)) for s, c in cfgs.items()}  # fmt: skip
    return cfgs


def time_sampling(
    model_fn: Callable[..., torch.Tensor], cfg: Any, device: str, batch: int, steps: int
) -> float:
    """Seconds for one DPM-Solver++ run of `steps` on `batch` samples (after one warm-up run)."""
    from model.config import get_preset
    from model.diffusion import GaussianDiffusion
    from model.samplers import SAMPLERS
    from model.seeding import PerSampleNoise

    diffusion = GaussianDiffusion.from_config(get_preset("tiny").diffusion)
    noise = PerSampleNoise(0, range(batch))
    x_T = noise.randn((cfg.in_channels, cfg.image_size, cfg.image_size), device=device)

    def run() -> float:
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.inference_mode():
            SAMPLERS["dpm++"](model_fn, diffusion, x_T, steps=steps, noise=noise.randn_like)
        if device == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    run()
    return run()


def check_throughput(size: int, smoke: bool, reference: Path | None) -> Result:
    from benchmarks.sampling import randomise_zero_layers, reference_path
    from model.inference import prepare_for_inference
    from model.unet import UNetModel

    if not cuda() and not smoke:
        return skipped("no CUDA device")
    device = "cuda" if cuda() else "cpu"
    cfg = configs(smoke)[size]
    batch, steps = (4, 3) if smoke else (BATCH, STEPS)
    net = randomise_zero_layers(UNetModel(cfg))
    ours = prepare_for_inference(net, device)
    result: Result = {"status": "ran", "device": device, "batch": batch, "steps": steps, "sampler": "dpm++",
                      "image_size": cfg.image_size, "precision": str(ours.dtype).removeprefix("torch."),
                      "parameters_M": round(sum(p.numel() for p in net.parameters()) / 1e6, 2)}  # fmt: skip
    result["ours_s_per_sample"] = time_sampling(ours, cfg, device, batch, steps) / batch
    del ours, net
    if reference is None or not (reference / "improved_diffusion" / "unet.py").exists():
        result["reference"] = "skipped: no improved-diffusion checkout (--reference or $IMPROVED_DIFFUSION)"
    else:
        ref = reference_path(reference, cfg)
        ref_net = getattr(ref, "__self__", None)
        if device == "cuda" and ref_net is not None:
            ref_net.to(device)
        ref_fn = _on_device(ref, device)
        result["reference_s_per_sample"] = time_sampling(ref_fn, cfg, device, batch, steps) / batch
        result["speedup_vs_reference"] = result["reference_s_per_sample"] / result["ours_s_per_sample"]
    if size == 256 and not smoke:
        result["goal_s_per_sample"] = 0.2
        result["meets_goal"] = result["ours_s_per_sample"] <= 0.2
    if device == "cuda":
        result["peak_memory_GiB"] = torch.cuda.max_memory_allocated() / 2**30
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    return result


def _on_device(fn: Callable[..., torch.Tensor], device: str) -> Callable[..., torch.Tensor]:
    """The reference path's model function with its network moved to `device`."""
    closure = getattr(fn, "__closure__", None) or ()
    for cell in closure:
        if isinstance(cell.cell_contents, torch.nn.Module):
            cell.cell_contents.to(device)
    return fn


# -- DDP ----------------------------------------------------------------------------------------
DDP_STEPS = 3


def ddp_worker(out: str) -> None:
    """One torchrun rank: a few steps of the tiny preset on synthetic slices."""
    from tests.training.test_ddp import synthetic_slices
    from training.config import preset_config
    from training.train import train

    device = "cuda" if cuda() else "cpu"
    cfg = preset_config("tiny", out=out, steps=DDP_STEPS, global_batch=8, micro_batch=2,
                        ckpt_every=DDP_STEPS, sample_count=0, progress=False, val_batches=0, precision="fp32",
                        device=device)  # fmt: skip
    train(cfg, (synthetic_slices(), [], "synthetic"))  # type: ignore[arg-type]


def check_ddp(smoke: bool) -> Result:
    if not cuda() and not smoke:
        return skipped("no CUDA device")
    ranks = torch.cuda.device_count() if cuda() else 2
    backend = "nccl" if cuda() else "gloo"
    with tempfile.TemporaryDirectory() as out:
        argv = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}",
                "-m", "benchmarks.gpu_check", "--ddp-worker", out]  # fmt: skip
        t0 = time.perf_counter()
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=300, env=env, cwd=REPO_ROOT)
        seconds = time.perf_counter() - t0
        weights = list(Path(out).rglob("model.safetensors"))
    if proc.returncode != 0 or not weights:
        return {"status": "failed", "reason": f"torchrun exited {proc.returncode}; {proc.stderr[-1500:]}"}
    return {"status": "ran", "backend": backend, "ranks": ranks, "steps": DDP_STEPS, "seconds": seconds}


# -- the real stack ---------------------------------------------------------------------------
def check_stack(smoke: bool) -> Result:
    if not cuda() and not smoke:
        return skipped("no CUDA device")
    from benchmarks.stack_common import Client, running_stack

    device = "cuda" if cuda() else "cpu"
    model = "tiny" if smoke else "demo"
    env = {"SYNTHMRI_DEVICE": device}
    t0 = time.perf_counter()
    with running_stack(model, env) as (stack, key):
        api = Client(stack, key)
        job_id = api.submit(model=model, count=4, seed=1, sampler="dpm++", steps=4 if smoke else 20)
        job = api.wait(job_id, timeout=300)
        manifest = api.http.get(f"/v1/jobs/{job_id}/manifest.json").json()
    ok = job["state"] == "succeeded" and manifest.get("device") == device
    return {"status": "ran" if ok else "failed", "device": manifest.get("device"),
            "precision": manifest.get("precision"), "seconds": time.perf_counter() - t0, "model": model,
            **({} if ok else {"reason": f"job {job['state']}, manifest device {manifest.get('device')}"})}


# -- driver -------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("gpu_check.json"))
    p.add_argument("--smoke", action="store_true", help="tiny sizes (minutes on a CPU)")
    p.add_argument("--reference", type=Path, default=os.environ.get("IMPROVED_DIFFUSION") or None)
    p.add_argument("--only", default="", help="comma-separated check names (default: all)")
    p.add_argument("--ddp-worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.ddp_worker:
        ddp_worker(args.ddp_worker)
        return 0
    ref = Path(args.reference) if args.reference else None
    checks: dict[str, Callable[[], Result]] = {
        "precision_bf16": lambda: check_precision("bf16", args.smoke),
        "precision_fp16": lambda: check_precision("fp16", args.smoke),
        **{f"throughput_{s}": (lambda s=s: check_throughput(s, args.smoke, ref)) for s in (64, 128, 256)},
        "ddp_nccl": lambda: check_ddp(args.smoke),
        "stack_job": lambda: check_stack(args.smoke),
    }
    only = {c for c in args.only.split(",") if c}
    results: dict[str, Result] = {}
    for name, fn in checks.items():
        if only and name not in only:
            results[name] = skipped("not selected (--only)")
            continue
        t0 = time.perf_counter()
        try:
            results[name] = fn()
        except Exception as e:
            results[name] = {"status": "failed", "reason": f"{type(e).__name__}: {e}",
                             "traceback": traceback.format_exc()[-3000:]}  # fmt: skip
        results[name]["wall_s"] = round(time.perf_counter() - t0, 2)
        print(f"{name:16s} {results[name]['status']:8s} {summary(results[name])}", flush=True)
    report = {"cuda": cuda(), "device_name": torch.cuda.get_device_name(0) if cuda() else "cpu",
              "torch": torch.__version__, "smoke": args.smoke, "checks": results}  # fmt: skip
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"results: {args.out}")
    return 1 if any(r["status"] == "failed" for r in results.values()) else 0


def summary(r: Result) -> str:
    if r["status"] != "ran":
        return str(r.get("reason", ""))[:200]
    keys = ("ours_s_per_sample", "reference_s_per_sample", "speedup_vs_reference", "batch_invariant",
            "backend", "device", "seconds")  # fmt: skip
    return ", ".join(f"{k}={r[k]:.4g}" if isinstance(r[k], float) else f"{k}={r[k]}" for k in keys if k in r)


if __name__ == "__main__":
    raise SystemExit(main())
