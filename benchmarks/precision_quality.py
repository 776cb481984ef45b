"""What a sampling precision costs in quality: ε-prediction error per precision on unseen data.

    python -m benchmarks.precision_quality [--model models/demo] [--subjects 3] [--seed 4242]
                                           [--slices 96] [--timesteps 10,50,150,500,950]

Writes `--subjects` phantom subjects with a seed the model was not trained on, takes
`--slices` evenly spaced axial slices, noises them with fixed noise at each timestep and
prints the mean squared error of the predicted ε for the float32 net and for each
reduced precision this CPU supports (`prepare_for_inference(precision=…)`), with its
change relative to float32. Lower is better; predicting ε = 0 scores 1.0.
"""

from __future__ import annotations

import argparse
import copy
import sys
import tempfile
from pathlib import Path

import torch

from model.checkpoint import load_checkpoint
from model.diffusion import GaussianDiffusion
from model.inference import prepare_for_inference, resolve_precision

ROOT = Path(__file__).resolve().parents[1]


def held_out_slices(channel_set: str, size: int, subjects: int, seed: int, count: int) -> torch.Tensor:
    from training.dataset import build_datasets
    from training.phantoms import write_phantoms

    with tempfile.TemporaryDirectory() as tmp:
        write_phantoms(Path(tmp) / "data", subjects, seed)
        slices, _, _ = build_datasets(
            str(Path(tmp) / "data"), channel_set, size, val_fraction=0.0, seed=0,
            cache_dir=str(Path(tmp) / "cache"), progress=False,
        )  # fmt: skip
        idx = torch.linspace(0, len(slices) - 1, count).long()
        return torch.stack([slices[int(i)] for i in idx]).float()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=ROOT / "models" / "demo")
    parser.add_argument("--subjects", type=int, default=3)
    parser.add_argument("--seed", type=int, default=4242, help="phantom seed (not the training one)")
    parser.add_argument("--slices", type=int, default=96)
    parser.add_argument("--timesteps", default="10,50,150,500,950")
    args = parser.parse_args(argv)

    ckpt = load_checkpoint(args.model)
    diffusion = GaussianDiffusion.from_config(ckpt.config.diffusion)
    cfg = ckpt.config
    x0 = held_out_slices(cfg.channel_set, cfg.image_size, args.subjects, args.seed, args.slices)
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(1))
    timesteps = [int(t) for t in args.timesteps.split(",")]
    precisions = ["fp32"]
    for name in ("bf16", "int8"):
        try:
            resolve_precision("cpu", name)
            precisions.append(name)
        except ValueError as exc:
            print(f"({name} skipped: {exc})", file=sys.stderr)

    mse: dict[str, list[float]] = {}
    for name in precisions:
        fn = prepare_for_inference(copy.deepcopy(ckpt.model), "cpu", precision=name)
        mse[name] = []
        for t_value in timesteps:
            t = torch.full((len(x0),), t_value)
            x_t = diffusion.q_sample(x0, t, noise)
            _, eps = diffusion.predict_xstart_and_eps(fn(x_t, t).float(), x_t, t)
            mse[name].append(((eps - noise) ** 2).mean().item())

    print(f"{args.model}: ε-MSE on {len(x0)} slices of {args.subjects} unseen phantom subjects "
          f"(seed {args.seed})")
    print("| t | " + " | ".join(precisions) + " |")
    print("|---" * (len(precisions) + 1) + "|")
    for i, t_value in enumerate(timesteps):
        ref = mse["fp32"][i]
        cells = [f"{ref:.5f}"]
        cells += [f"{mse[p][i]:.5f} ({(mse[p][i] / ref - 1) * 100:+.1f} %)" for p in precisions[1:]]
        print(f"| {t_value} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
