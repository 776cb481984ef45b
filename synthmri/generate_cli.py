"""`synthmri generate`: request samples from a running service, show progress, download them."""

from __future__ import annotations

import os
import sys

from synthmri.cli import CliError, make_parser
from synthmri.client import Client, ServiceError
from synthmri.contract import DEFAULT_GUIDANCE, SAMPLERS
from synthmri.given import GivenError, parse_given_options


def main(argv: list[str]) -> int:
    p = make_parser("generate", "Submit a job to a SynthMRI service and download its files.")
    p.add_argument("--url", default=os.environ.get("SYNTHMRI_URL", "http://127.0.0.1:8000"),
                   help="service URL (env SYNTHMRI_URL)")  # fmt: skip
    p.add_argument(
        "--api-key", default=os.environ.get("SYNTHMRI_API_KEY"), help="API key (env SYNTHMRI_API_KEY)"
    )
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--channels", help="channel set, e.g. t1ce+seg")
    what.add_argument("--model", help="model name (see /v1/models)")
    p.add_argument("--count", type=int, required=True, help="number of samples")
    p.add_argument("--seed", type=int, help="seed (random if absent; recorded in manifest.json)")
    p.add_argument("--sampler", choices=SAMPLERS, help="sampler (default: the model's recommended one)")
    p.add_argument("--steps", type=int, help="sampler steps (default: recommended, else per sampler)")
    p.add_argument("--formats", default="nifti,png", help="comma-separated: nifti,png,npz,nnunet")
    p.add_argument("--nnunet", action="store_true",
                   help="also get the job as an nnU-Net v2 raw dataset: OUT/Dataset501_SynthMRI "
                   "(needs a channel set with seg; adds nnunet and nifti to --formats)")  # fmt: skip
    p.add_argument("--given", action="append", default=[], metavar="CHANNEL=FILE",
                   help="a known channel the samples keep (NIfTI or grayscale PNG), e.g. seg=mask.nii.gz; "
                   "repeat a channel to give one file per sample, in order")  # fmt: skip
    p.add_argument("--guidance", type=float,
                   help=f"reconstruction-guidance weight for --given channels (default {DEFAULT_GUIDANCE:g}; "
                   "0: substitution only)")  # fmt: skip
    p.add_argument("--out", required=True, help="directory for the unpacked results")
    p.add_argument("--timeout", type=float, help="give up after this many seconds")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    if not args.api_key:
        raise CliError("no API key: pass --api-key KEY or set SYNTHMRI_API_KEY")
    if args.guidance is not None and not args.given:
        raise CliError("--guidance applies to known channels: give them with --given CHANNEL=FILE")
    try:
        given = parse_given_options(args.given)
    except GivenError as e:
        raise CliError(e.detail) from None
    formats = [f.strip() for f in args.formats.split(",") if f.strip()]
    if args.nnunet:
        formats += [f for f in ("nifti", "nnunet") if f not in formats]

    from tqdm import tqdm

    with Client(args.url, args.api_key) as client:
        try:
            job = client.submit(
                channels=args.channels,
                model=args.model,
                count=args.count,
                seed=args.seed,
                sampler=args.sampler,
                steps=args.steps,
                formats=formats,
                guidance=args.guidance,
                given=given,
            )
            bar = tqdm(total=100, unit="%", desc=f"job {job['id']}", disable=args.quiet, file=sys.stderr)

            def show(j: dict[str, object]) -> None:
                progress = j["progress"]
                assert isinstance(progress, dict)
                bar.n = round(100 * float(progress["fraction"]))
                bar.set_postfix_str(f"{j['state']} {progress['samples_done']}/{progress['samples_total']}")
                bar.refresh()

            try:
                job = client.wait(job["id"], timeout=args.timeout, progress=show)
            except KeyboardInterrupt:
                client.cancel(job["id"])
                raise
            finally:
                bar.close()
            if job["state"] != "succeeded":
                raise CliError(f"job {job['id']} {job['state']}: {job.get('error') or 'no details'}")
            files = client.download_all(job["id"], args.out)
            dataset = client.download_nnunet(job["id"], args.out) if "nnunet" in formats else None
        except ServiceError as e:
            raise CliError(str(e)) from None
    print(f"job {job['id']}: {len(files)} files in {args.out} (seed {job['seed']})")
    if dataset is not None:
        print(f"nnU-Net dataset: {dataset} (move it into $nnUNet_raw, then nnUNetv2_plan_and_preprocess)")
    return 0
