"""`synthmri eval`: evaluate a checkpoint against real held-out slices.

    synthmri eval --model models/demo --data DIR --out DIR [--train-data DIR] [--quick]

Writes report.md, report.json and figures into --out and the model card (eval.json)
beside the checkpoint, unless --no-card.
"""

from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path

from synthmri.cli import CliError, make_parser


def parse_samplers(text: str) -> tuple[tuple[str, int], ...]:
    """'ddpm:250,dpm++:20' → (('ddpm', 250), ('dpm++', 20))."""
    from synthmri.contract import SAMPLERS

    out = []
    for item in text.split(","):
        name, _, steps = item.strip().partition(":")
        if name not in SAMPLERS or not steps.isdigit() or int(steps) < 1:
            raise CliError(
                f"bad sampler setting {item.strip()!r}: use NAME:STEPS with NAME one of "
                f"{', '.join(SAMPLERS)}, e.g. dpm++:20"
            )
        out.append((name, int(steps)))
    return tuple(out)


def parse_ints(text: str, what: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise CliError(f"{what} must be comma-separated integers, got {text!r}") from None
    if any(v < 1 for v in values):
        raise CliError(f"{what} must be ≥ 1")
    return values


def main(argv: list[str] | None = None) -> int:
    parser = make_parser("eval", "Evaluate a checkpoint's samples against real held-out slices.")
    parser.add_argument("--model", required=True, help="checkpoint directory")
    parser.add_argument("--data", required=True, help="BraTS or phantom folder with held-out subjects")
    parser.add_argument("--out", required=True, help="report folder (created)")
    parser.add_argument(
        "--train-data",
        default=None,
        help="the model's training data; then every subject of --data is held out",
    )
    parser.add_argument("--quick", action="store_true", help="fewer samples and settings (minutes on a CPU)")
    parser.add_argument("--samples", type=int, default=None, help="synthetic slices per sampler setting")
    parser.add_argument(
        "--samplers",
        default=None,
        help="settings as NAME:STEPS,… (default: "
        "ddpm:1000,ddpm:250,ddim:50,dpm++:20 and the model card's recommendation)",
    )
    parser.add_argument("--budgets", default=None, help="real-slice budgets K of the downstream study")
    parser.add_argument("--seed", type=int, default=4711, help="request seed of the synthetic slices")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--no-card", action="store_true", help="do not write eval.json beside the checkpoint")
    args = parser.parse_args(argv)

    from model.checkpoint import CheckpointError
    from training.brats import DataError
    from training.evaluation.run import EvalOptions, evaluate

    opts = EvalOptions.quick() if args.quick else EvalOptions()
    opts = replace(
        opts, seed=args.seed, device=args.device, batch_size=args.batch_size, progress=sys.stderr.isatty()
    )
    if args.samples is not None:
        if args.samples < 8:
            raise CliError("--samples must be ≥ 8")
        opts = replace(opts, samples=args.samples)
    if args.samplers:
        opts = replace(opts, samplers=parse_samplers(args.samplers))
    if args.budgets:
        opts = replace(opts, budgets=parse_ints(args.budgets, "--budgets"))
    for flag, path in (("--model", args.model), ("--data", args.data), ("--train-data", args.train_data)):
        if path is not None and not Path(path).is_dir():
            raise CliError(f"{flag} {path} is not a directory")
    try:
        report = evaluate(
            args.model,
            args.data,
            args.out,
            train_data=args.train_data,
            options=opts,
            write_card=not args.no_card,
            log=lambda m: print(m, file=sys.stderr),
        )
    except (CheckpointError, DataError, ValueError) as e:
        raise CliError(str(e)) from None
    rec = report["recommended"]
    print(f"{Path(args.out) / 'report.md'}: recommended {rec['sampler']} {rec['steps']}")
    return 0
