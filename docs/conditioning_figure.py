"""Draw docs/conditioning-t1ce-to-rest.png: held-out T1CE slices given, T1, T2, FLAIR and the mask generated.

.venv/bin/python docs/conditioning_figure.py [--data /work/data/heldout8] [--model models/demo]

The real T1CE slices are written as the service writes NIfTIs and given to `synthmri sample
--given t1ce=...` (the same reading, checking and sampling code as a job's uploads); the
figure puts the real slices beside the generated ones.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import nibabel as nib
import numpy as np
from PIL import Image, ImageDraw, ImageFont

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from model.checkpoint import read_config  # noqa: E402
from synthmri.channels import SEG, decode_labels  # noqa: E402
from synthmri.cli import main as synthmri  # noqa: E402
from synthmri.outputs.writers import nifti_bytes, render_grid  # noqa: E402
from training.brats import find_subjects, load_subject  # noqa: E402
from training.preprocess import SliceParams, percentile_slices  # noqa: E402

OUT = Path(__file__).with_name("conditioning-t1ce-to-rest.png")


def heldout_slices(data: Path, channels: tuple[str, ...], size: int, count: int) -> np.ndarray:
    """(count, C, S, S) model-range slices: per subject the slice with the largest tumour."""
    params = SliceParams(channels=channels, image_size=size)
    picked = []
    for subject in find_subjects(data)[:count]:
        slices = percentile_slices(load_subject(subject), params).data.astype(np.float32)
        area = (decode_labels(slices[:, channels.index(SEG)]) > 0).sum(axis=(1, 2))
        picked.append(slices[int(area.argmax())])
    return np.stack(picked)


def decoded(x: np.ndarray, channels: tuple[str, ...]) -> dict[str, np.ndarray]:
    return {c: decode_labels(x[k]) if c == SEG else (x[k] + 1) / 2 for k, c in enumerate(channels)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, default=Path("/work/data/heldout8"))
    p.add_argument("--model", type=Path, default=ROOT / "models" / "demo")
    p.add_argument("--count", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    cfg = read_config(args.model)
    channels = cfg.channels
    real = heldout_slices(args.data, channels, cfg.image_size, args.count)
    with tempfile.TemporaryDirectory() as tmp:
        given = []
        for i, x in enumerate(real):
            path = Path(tmp) / f"t1ce_{i}.nii.gz"
            path.write_bytes(nifti_bytes(np.clip((x[channels.index("t1ce")] + 1) / 2, 0, 1), "t1ce"))
            given += ["--given", f"t1ce={path}"]
        out = Path(tmp) / "out"
        code = synthmri(["sample", "--model", str(args.model), "--count", str(args.count), "--seed",
                         str(args.seed), *given, "--out", str(out), "--no-progress"])  # fmt: skip
        if code:
            raise SystemExit(code)
        generated = [
            {c: np.asarray(nib.load(out / f"sample_{i:04d}_{c}.nii.gz").dataobj)[:, :, 0] for c in channels}
            for i in range(args.count)
        ]
        manifest = json.loads((out / "manifest.json").read_text())
    left, _ = render_grid([decoded(x, channels) for x in real], channels)
    right, _ = render_grid(generated, channels)
    title = 32
    canvas = Image.new("RGB", (left.width + right.width + 24, left.height + title), (20, 20, 24))
    canvas.paste(left, (0, title))
    canvas.paste(right, (left.width + 24, title))
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default(size=16)
    white = (235, 235, 235)
    how = f"{manifest['sampler']} {manifest['steps']}, guidance {manifest['given']['guidance']:g}"
    draw.text((8, 8), "real held-out slices (their T1CE is given)", fill=white, font=font)
    draw.text((left.width + 32, 8), f"generated for those T1CE slices ({how})", fill=white, font=font)
    canvas.save(OUT)
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
