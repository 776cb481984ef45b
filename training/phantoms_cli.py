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
    parser.add_argument("--preview", type=Path, default=None,
                        help="also save a PNG montage (slice through the tumour) of the first ≤4 subjects")
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
    if args.preview is not None:
        from training.brats import find_subjects, load_subject

        shown = [s for s in find_subjects(args.out) if s.folder in folders][:4]
        save_montage(args.preview, [(s.id, load_subject(s)) for s in shown])
        print(f"preview: {args.preview}")
    return 0


def save_montage(path: Path, subjects: list[tuple[str, dict]]) -> None:
    """Rows = subjects (axial slice with the most tumour), columns = T1, T1CE, T2, FLAIR, FLAIR + seg.

    Displayed as `img.T` (anterior up, patient right on the left: radiological view).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    from matplotlib.colors import ListedColormap

    # NCR red, ED green, ET yellow; label 3 unused.
    overlay = ListedColormap([(0, 0, 0, 0), (1, 0.15, 0.15, 0.65), (0.2, 0.9, 0.2, 0.45), (0, 0, 0, 0),
                              (1, 0.9, 0.1, 0.7)])
    titles = {"t1": "T1", "t1ce": "T1CE", "t2": "T2", "flair": "FLAIR"}
    fig, axes = plt.subplots(len(subjects), 5, figsize=(12.5, 2.7 * len(subjects)), facecolor="black",
                             squeeze=False)
    for r, (name, vols) in enumerate(subjects):
        z = int(np.argmax((vols["seg"] > 0).sum((0, 1))))
        for c, m in enumerate(["t1", "t1ce", "t2", "flair", "seg"]):
            ax = axes[r, c]
            base = vols["flair" if m == "seg" else m]
            top = float(np.percentile(base[base > 0], 99.5))
            ax.imshow(base[:, :, z].T, cmap="gray", vmin=0, vmax=top, interpolation="nearest")
            if m == "seg":
                ax.imshow(vols["seg"][:, :, z].T, cmap=overlay, vmin=0, vmax=4, interpolation="nearest")
            ax.set_axis_off()
            label = "FLAIR + seg (NCR red, ED green, ET yellow)" if m == "seg" else titles[m]
            if r == 0:
                ax.set_title(label, color="white", fontsize=8)
        axes[r, 0].text(3, 12, f"{name}  z={z}", color="white", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=80, facecolor="black")
    plt.close(fig)
