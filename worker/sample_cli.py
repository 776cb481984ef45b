"""`synthmri sample`: sample a checkpoint locally into NIfTI, PNG, grid, manifest (and .npz), zipped.

Uses the same `model.generate.generate` and `synthmri.outputs` as the service worker, so
a local run with the same seed gives the same samples, in the same files, as a job; only
the prefix, npz and zip are named after `--name` (see `RunNames.local`). Known channels
(`--given seg=mask.nii.gz`) are checked by the same code as the service's uploads and kept
under `inputs/`.
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from synthmri import __version__
from synthmri.cli import CliError, make_parser
from synthmri.contract import DEFAULT_GUIDANCE, MAX_GUIDANCE

if TYPE_CHECKING:
    import numpy as np

    from model.checkpoint import LoadedCheckpoint
    from synthmri.given import GivenChannels

SAMPLER_NAMES = ("dpm++", "dpm++sde", "ddim", "ddpm")
PRECISIONS = ("auto", "fp32", "bf16", "fp16", "int8")
MAX_SEED = 2**63 - 1
_PREFIX = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


def build_parser() -> argparse.ArgumentParser:
    p = make_parser("sample", description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--model", required=True, type=Path, help="checkpoint directory")
    p.add_argument("--count", required=True, type=int, help="number of samples")
    p.add_argument("--seed", required=True, type=int, help="request seed (sample i uses (seed, i))")
    p.add_argument("--sampler", default=None, choices=SAMPLER_NAMES,
                   help="sampler (default: the model card's recommendation, else dpm++)")
    p.add_argument("--steps", type=int, default=None,
                   help="sampler steps (default: the model card's recommendation or the sampler's)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--precision", default="auto", choices=PRECISIONS)
    p.add_argument("--npz", action="store_true", help="also write {name}.npz (N×H×W×C uint8, arr_0)")
    p.add_argument("--name", default="sample", help="file name prefix (default: sample)")
    p.add_argument("--given", action="append", default=[], metavar="CHANNEL=FILE",
                   help="a known channel the samples keep (NIfTI or grayscale PNG), e.g. seg=mask.nii.gz; "
                   "repeat a channel to give one file per sample, in order")  # fmt: skip
    p.add_argument("--guidance", type=float, default=None,
                   help=f"reconstruction-guidance weight for --given channels (default {DEFAULT_GUIDANCE:g}; "
                   "0: substitution only)")  # fmt: skip
    p.add_argument("--out", required=True, type=Path, help="output directory")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    return p


def _check_args(args: argparse.Namespace) -> None:
    if args.count < 1:
        raise CliError(f"--count must be ≥ 1, got {args.count}")
    if not 0 <= args.seed <= MAX_SEED:
        raise CliError(f"--seed must be in 0..{MAX_SEED}, got {args.seed}")
    if args.steps is not None and args.steps < 1:
        raise CliError(f"--steps must be ≥ 1, got {args.steps}")
    if args.batch_size < 1:
        raise CliError(f"--batch-size must be ≥ 1, got {args.batch_size}")
    if not _PREFIX.match(args.name):
        raise CliError(f"--name {args.name!r} must be letters, digits, '.', '_' or '-' (≤ 64)")
    if not args.model.is_dir():
        raise CliError(f"--model {args.model} is not a checkpoint directory")
    if args.out.exists() and not args.out.is_dir():
        raise CliError(f"--out {args.out} exists and is not a directory")
    if args.guidance is not None and not args.given:
        raise CliError("--guidance applies to known channels: give them with --given CHANNEL=FILE")
    if args.guidance is not None and not 0 <= args.guidance <= MAX_GUIDANCE:
        raise CliError(f"--guidance must be in 0..{MAX_GUIDANCE:g}, got {args.guidance}")
    from synthmri.given import GivenError, parse_given_options

    try:
        args.given_files = parse_given_options(args.given)
    except GivenError as e:
        raise CliError(e.detail) from None


def main(argv: Sequence[str]) -> int:
    args = build_parser().parse_args(list(argv))
    _check_args(args)

    import torch

    from model.checkpoint import CheckpointError, load_checkpoint
    from model.generate import generate, resolve_steps
    from model.inference import differentiable_precision, resolved_precision_name
    from synthmri.given import known_rows

    if args.device == "cuda" and not torch.cuda.is_available():
        raise CliError("--device cuda was requested but no CUDA device is available (use --device cpu)")
    from synthmri.contract import resolve_sampling
    from synthmri.modelcard import read_card, recommendation

    args.sampler, steps = resolve_sampling(args.sampler, args.steps, recommendation(read_card(args.model)))
    steps = resolve_steps(args.sampler, steps)
    try:
        precision = resolved_precision_name(args.device, args.precision)
    except ValueError as e:
        raise CliError(f"--precision {args.precision}: {e}") from None

    t0 = time.perf_counter()
    try:
        ckpt = load_checkpoint(args.model, device=args.device)
    except CheckpointError as e:
        raise CliError(str(e)) from None
    t_load = time.perf_counter() - t0
    known = read_given(args, ckpt)
    conditioning: dict[str, Any] = {}
    run_precision = args.precision
    if known is not None:
        conditioning = {"known": known_rows(known.values, ckpt.config.channels, range(args.count)),
                        "given": known.channels, "guidance": known.guidance}  # fmt: skip
        if known.guidance > 0:  # guidance differentiates the network: a float precision, never int8
            run_precision = precision = differentiable_precision(args.device, args.precision)

    indices = list(range(args.count))
    bar = _progress_bar(args, total=steps * args.count)  # sample-steps, as generate() reports them

    def progress(done: int, total: int) -> None:
        if bar is not None:
            bar.update(done - bar.n)

    t1 = time.perf_counter()
    try:
        x = generate(
            ckpt,
            seed=args.seed,
            indices=indices,
            sampler=args.sampler,
            steps=steps,
            batch_size=args.batch_size,
            device=args.device,
            progress=progress,
            precision=run_precision,
            **conditioning,
        )
    finally:
        if bar is not None:
            bar.close()
    t_sample = time.perf_counter() - t1

    timings = {"load_s": t_load, "sample_s": t_sample}
    write_outputs(args, ckpt, x, steps, precision, timings=timings, known=known)
    print(
        f"wrote {args.count} sample(s) × {len(ckpt.config.channels)} channel(s) to {args.out} "
        f"({args.sampler}, {steps} steps, {t_sample:.1f} s sampling)"
    )
    return 0


def read_given(args: argparse.Namespace, ckpt: LoadedCheckpoint) -> GivenChannels | None:
    """The --given files, checked as the service checks uploads (a one-line CliError if not usable)."""
    from synthmri.given import GivenError, ModelSlices, prepare_known, uploads_from

    if not args.given_files:
        return None
    cfg = ckpt.config
    model = ModelSlices(cfg.name, cfg.channels, cfg.image_size, cfg.normalisation.method,
                        cfg.normalisation.low_percentile, cfg.normalisation.high_percentile,
                        cfg.label_levels)  # fmt: skip
    try:
        uploads = uploads_from(args.given_files)
        return prepare_known(uploads, model, count=args.count, outputs=cfg.channels, guidance=args.guidance)
    except GivenError as e:
        raise CliError(e.detail) from None


def write_outputs(
    args: argparse.Namespace, ckpt: LoadedCheckpoint, x: np.ndarray, steps: int, precision: str,
    timings: dict[str, float], known: GivenChannels | None = None,
) -> None:
    """The samples' files, grid, npz, manifest and zip: a job's outputs, named after --name."""
    import torch

    from model.generate import decode_sample
    from synthmri.outputs import writers
    from synthmri.outputs.layout import RunNames

    t0 = time.perf_counter()
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    names = RunNames.local(args.name)
    cfg = ckpt.config
    indices = list(range(len(x)))
    decoded = [decode_sample(s, cfg) for s in x]
    files = [p.name for i, sample in zip(indices, decoded, strict=True)
             for p in writers.write_sample(out, names.prefix, i, sample)]  # fmt: skip
    raw = x if args.npz else None
    files += writers.write_run_summary(out, names, decoded, indices, cfg.channels, raw=raw)
    extra: dict[str, Any] = {}
    if known is not None:
        known.write(out)
        files += [f.path for f in known.files]
        extra["given"] = known.record().model_dump(mode="json")
    timings = {**timings, "write_s": time.perf_counter() - t0,
               "images_steps_per_s": len(indices) * steps / max(timings["sample_s"], 1e-9)}  # fmt: skip
    request: dict[str, Any] = {"count": args.count, "seed": args.seed, "sampler": args.sampler,
                               "steps": args.steps, "name": args.name}  # fmt: skip
    if known is not None:
        request.update(given=args.given, guidance=args.guidance)
    manifest = writers.make_manifest(
        seed=args.seed, sampler=args.sampler, steps=steps, sha256=ckpt.sha256, model=cfg.name,
        channel_set=cfg.channel_set, channels=cfg.channels, image_size=cfg.image_size, indices=indices,
        files=[*files, names.archive], timings=timings, version=__version__, batch_size=args.batch_size,
        device=args.device, precision=precision, torch_version=torch.__version__, request=request, **extra,
    )  # fmt: skip
    writers.write_manifest_and_archive(out, names, files, manifest)


def _progress_bar(args: argparse.Namespace, total: int) -> Any:
    if args.no_progress:
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc="sampling", unit="sample-step", file=sys.stderr, dynamic_ncols=True)
