"""`synthmri demo-model`: train the small demo model the service ships, from phantoms, on a budget.

    synthmri demo-model [--out models/demo] [--minutes 10] [--subjects 8] [--seed 0]

Writes phantom subjects (training.phantoms), builds the 64² five-channel slice set
(t1+t1ce+t2+flair+seg) and trains the `demo` preset. The whole command, phantoms and
the final sample grid included, stays within `--minutes`: the loop's `max_minutes`
stop ends training when the budget left after phantoms and preprocessing is used (the
demo recipe's LR is constant, so stopping early costs no schedule). A short
calibration of a few steps only sizes the progress bar.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from synthmri.cli import CliError, make_parser

DEMO_CHANNELS = "t1+t1ce+t2+flair+seg"
# Sampling the grid, saving and start-up: kept out of the training budget.
RESERVE_S = 45.0


def seconds_per_step(global_batch: int, steps: int = 3) -> float:
    """Time optimiser steps of the demo model at `global_batch` on random data (first one is warm-up)."""
    import torch

    from model.config import get_preset
    from model.diffusion import GaussianDiffusion
    from model.unet import UNetModel
    from training.train import accumulate_gradients, draw_t_noise

    preset = get_preset("demo", DEMO_CHANNELS)
    torch.manual_seed(0)
    model = UNetModel(preset.model)
    diffusion = GaussianDiffusion.from_config(preset.diffusion)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    shape = (preset.model.in_channels, preset.model.image_size, preset.model.image_size)
    x = torch.rand(global_batch, *shape) * 2 - 1
    times = []
    for k in range(steps):
        t0 = time.perf_counter()
        positions = range(k * global_batch, (k + 1) * global_batch)
        t, noise = draw_t_noise(positions, shape, diffusion.num_timesteps, 0)
        accumulate_gradients(model, diffusion, x, t, noise, global_batch)
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
    return sorted(times[1:])[len(times[1:]) // 2]


def main(argv: list[str] | None = None) -> int:
    parser = make_parser("demo-model", "Train the demo model on phantom subjects within a time budget.")
    parser.add_argument("--out", default="models/demo", help="checkpoint directory (default: models/demo)")
    parser.add_argument("--minutes", type=float, default=10.0, help="wall-time budget for everything")
    parser.add_argument("--subjects", type=int, default=8, help="phantom subjects to train on")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=0, help="fixed step count instead of the budget's")
    parser.add_argument("--data", default="", help="existing phantom/BraTS folder (skips writing phantoms)")
    parser.add_argument("--work", default="", help="keep phantoms and slice cache here (default: temporary)")
    parser.add_argument("--progress", default="true", choices=["true", "false"])
    args = parser.parse_args(argv)
    if args.minutes <= 1:
        raise CliError("--minutes must be more than 1 (phantoms alone take a while)")
    if args.subjects < 2:
        raise CliError("--subjects must be ≥ 2 (one is held out for validation)")
    t_start = time.perf_counter()
    summary = build_demo(args.out, minutes=args.minutes, subjects=args.subjects, seed=args.seed,
                         steps=args.steps, data=args.data, work=args.work, progress=args.progress == "true",
                         t_start=t_start)
    print(f"demo model: {summary['out']} (step {summary['step']}, loss {summary['loss']:.4f}, "
          f"{(time.perf_counter() - t_start) / 60:.1f} min)")
    return 0


def build_demo(out: str, *, minutes: float, subjects: int, seed: int, steps: int = 0, data: str = "",
               work: str = "", progress: bool = True, t_start: float | None = None) -> dict[str, Any]:
    """Phantoms → dataset → `demo` preset training within `minutes` of wall time from `t_start`."""
    from training.config import preset_config
    from training.train import load_datasets, train

    t_start = time.perf_counter() if t_start is None else t_start
    budget_s = minutes * 60
    work_dir = Path(work) if work else Path(tempfile.mkdtemp(prefix="synthmri-demo-"))
    try:
        data_dir = Path(data) if data else work_dir / "phantoms"
        if not data:
            from training.phantoms import write_phantoms

            print(f"writing {subjects} phantom subjects to {data_dir}", file=sys.stderr)
            write_phantoms(data_dir, subjects, seed, progress=progress)
        recipe = preset_config("demo", channels=DEMO_CHANNELS, data=str(data_dir),
                               cache_dir=str(work_dir / "cache"), seed=seed, progress=progress)
        datasets = load_datasets(recipe, is_master=True, ddp=False)
        calibration = None
        fixed_steps = bool(steps)
        if not steps:
            calibration = seconds_per_step(recipe.global_batch)
            left = budget_s - (time.perf_counter() - t_start) - RESERVE_S
            # Headroom: the CPU is often shared, so the wall-time stop (not `steps`) normally ends
            # the run; with the preset's constant LR that costs nothing.
            steps = max(50, int(2.0 * left / calibration))
        remaining_min = (budget_s - (time.perf_counter() - t_start) - RESERVE_S) / 60
        # A fixed step count gets a cosine decay to the end (known length); a wall-time budget keeps
        # the preset's constant LR, since the stop may come at any step.
        schedule = {"lr_schedule": "cosine", "min_lr": recipe.lr / 20} if fixed_steps else {}
        cfg = preset_config(
            "demo", channels=DEMO_CHANNELS, data=str(data_dir), out=str(out), steps=steps, **schedule,
            cache_dir=str(work_dir / "cache"), max_minutes=max(0.5, remaining_min), seed=seed,
            warmup=min(recipe.warmup, max(1, steps // 10)), ckpt_every=max(1, min(recipe.ckpt_every, steps)),
            sample_every=max(1, steps // 4), progress=progress,
        )
        provenance = {"demo": {"phantom_subjects": subjects if not data else None, "phantom_seed": seed,
                               "data": "phantoms" if not data else Path(data).name, "budget_minutes": minutes,
                               "calibrated_seconds_per_step": calibration}}
        summary = train(cfg, datasets, extra_provenance=provenance)
        grids = sorted((Path(out) / "samples").glob("step*.png"))
        if grids:
            shutil.copyfile(grids[-1], Path(out) / "samples.png")
        return summary
    finally:
        if not work:
            shutil.rmtree(work_dir, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
