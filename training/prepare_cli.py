"""`synthmri prepare`: preprocess a BraTS folder (or prepared PNGs) into the slice cache."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from synthmri.channels import CHANNEL_SETS, ChannelSetError
from synthmri.cli import CliError, make_parser
from training.brats import DataError
from training.dataset import MODES, prepare_cache, skip_report, split_subjects


def main(argv: list[str]) -> int:
    parser = make_parser("prepare", "preprocess BraTS subjects into the memory-mapped slice cache")
    parser.add_argument("--data", type=Path, required=True, help="BraTS folder or prepared PNG folders")
    parser.add_argument("--channels", choices=list(CHANNEL_SETS), required=True, help="channel set")
    parser.add_argument("--size", type=int, required=True, help="model image size (e.g. 64, 128, 256)")
    parser.add_argument("--mode", choices=MODES, default="percentile", help="intensity preprocessing")
    parser.add_argument("--cache", type=Path, default=None,
                        help="cache folder (default <data>/.synthmri-cache, or the user cache if read-only)")
    parser.add_argument("--min-brain-fraction", type=float, default=0.1,
                        help="skip axial slices with less brain than this fraction (percentile mode)")
    parser.add_argument("--crop", choices=("brain", "full"), default="brain",
                        help="square crop around the brain, or the whole slice")
    parser.add_argument("--val-fraction", type=float, default=0.1, help="share of subjects held out")
    parser.add_argument("--seed", type=int, default=0, help="seed of the subject split")
    parser.add_argument("--slice-pattern", default="",
                        help="PNG folders: regular expression with a (?P<subject>...) group (and optionally "
                             "(?P<slice>\\d+)) matched against file names without .png; default: "
                             "<subject>_slice<n> or <subject>_<n>")
    parser.add_argument("--skip-bad-subjects", action="store_true",
                        help="leave out subjects whose own files have a problem (missing, unreadable, "
                             "unknown labels) and list them, instead of stopping at the first")
    args = parser.parse_args(argv)
    if args.size < 8:
        raise CliError("--size must be at least 8")
    if not 0.0 <= args.min_brain_fraction <= 1.0:
        raise CliError("--min-brain-fraction must be in [0, 1]")
    if not 0.0 <= args.val_fraction < 1.0:
        raise CliError("--val-fraction must be in [0, 1)")
    try:
        cache, subjects = prepare_cache(
            args.data,
            args.channels,
            args.size,
            mode=args.mode,
            cache_dir=args.cache,
            min_brain_fraction=args.min_brain_fraction,
            crop=args.crop,
            slice_pattern=args.slice_pattern,
            skip_bad_subjects=args.skip_bad_subjects,
            progress=True,
        )
    except (DataError, ChannelSetError) as e:
        raise CliError(str(e)) from None
    if cache.skipped:
        print(skip_report(cache.skipped), file=sys.stderr)
    n = int(cache.index["shape"][0])
    if cache.index.get("tumour_flags", True):
        tumour = f"{int(np.count_nonzero(cache.has_tumour))} with tumour"
    else:
        tumour = f"masks not read for {args.channels}"
    train, val = split_subjects([s.id for s in subjects], args.val_fraction, args.seed)
    state = "reused" if cache.reused else "built"
    print(f"{len(subjects)} subjects ({len(train)} train / {len(val)} val), {n} slices "
          f"({tumour}), {cache.index['dtype']} {tuple(cache.index['shape'][1:])}, "
          f"mode {cache.index['params']['mode']}")
    print(f"cache {state}: {cache.folder}")
    print(f"fingerprint {cache.fingerprint}")
    return 0
