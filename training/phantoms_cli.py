"""`synthmri phantoms`: write BraTS-layout phantom subjects (see training/phantoms.py)."""

from __future__ import annotations

from pathlib import Path

from synthmri.cli import CliError, make_parser
from training.anatomy import TemplateError
from training.phantoms import NAMINGS, write_phantoms


def main(argv: list[str]) -> int:
    parser = make_parser("phantoms", "write BraTS-like phantom subjects (240×240×155, 1 mm, 5 NIfTI files)")
    parser.add_argument("--subjects", type=int, required=True, help="number of subjects to write")
    parser.add_argument("--out", type=Path, required=True, help="output folder (created)")
    parser.add_argument("--seed", type=int, default=0, help="subject i depends only on (seed, i)")
    parser.add_argument("--naming", choices=NAMINGS, default="2020", help="challenge file layout")
    parser.add_argument("--start", type=int, default=0, help="index of the first subject")
    args = parser.parse_args(argv)
    if args.subjects < 1:
        raise CliError("--subjects must be at least 1")
    if args.start < 0:
        raise CliError("--start must be ≥ 0")
    if args.out.exists() and not args.out.is_dir():
        raise CliError(f"--out {args.out} exists and is not a folder")
    try:
        args.out.mkdir(parents=True, exist_ok=True)
        folders = write_phantoms(
            args.out,
            range(args.start, args.start + args.subjects),
            seed=args.seed,
            naming=args.naming,
            progress=True,
        )
    except TemplateError as e:
        raise CliError(str(e)) from None
    except OSError as e:
        raise CliError(f"cannot write to {args.out}: {e.strerror or e}") from None
    print(f"wrote {len(folders)} subjects ({args.naming} naming) to {args.out}")
    return 0
