"""Names of the files a sampling run writes, and where they lie in a job directory.

A job directory `{results_dir}/{job_id}/` holds, per sample and channel, the files named
by `sample_filename`, then the grid, the manifest, the archive of it all, optionally the
research npz and the nnU-Net dataset zip (not in the archive), and two hidden entries: the
per-sample parts that mark a sample complete and the expiry marker that tells the sweeper
when the directory may go. A job with known channels also has `inputs/`: the files as
uploaded and the values the worker samples with.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

GRID = "grid.png"
MANIFEST = "manifest.json"
JOB_ARCHIVE = "archive.zip"
JOB_NPZ = "samples.npz"
NNUNET_ARCHIVE = "nnunet.zip"  # with "nnunet" in formats: the job as an nnU-Net v2 raw dataset
PARTS_DIR = ".parts"
EXPIRY_MARKER = ".expires"  # holds the unix time after which the directory may be removed
INPUTS_DIR = "inputs"
KNOWN_VALUES = f"{INPUTS_DIR}/known.npz"  # channel → (1 or count, H, W) float32 in the model range

# Output format (as requested in a job's `formats`) → file extension, and the other way round.
FORMAT_EXTENSIONS = {"nifti": "nii.gz", "png": "png"}
EXTENSION_FORMATS = {ext: fmt for fmt, ext in FORMAT_EXTENSIONS.items()}
MEDIA_TYPES = {"nii.gz": "application/gzip", "png": "image/png", "json": "application/json",
               "zip": "application/zip"}  # fmt: skip


def sample_filename(prefix: str, index: int, channel: str, ext: str) -> str:
    """`{prefix}_{i:04d}_{channel}.{ext}` (BraTS-style naming)."""
    return f"{prefix}_{index:04d}_{channel}.{ext}"


def sample_label(index: int) -> str:
    """How a sample is labelled where it is shown (grid rows): its zero-padded index."""
    return f"{index:04d}"


def sample_files(prefix: str, index: int, channels: Iterable[str], formats: Iterable[str]) -> list[str]:
    """The per-sample file names of sample `index`, channel by channel, in the given formats."""
    exts = [ext for fmt, ext in FORMAT_EXTENSIONS.items() if fmt in formats]
    return [sample_filename(prefix, index, channel, ext) for channel in channels for ext in exts]


def input_filename(channel: str, applies: str, samples: list[int], ext: str) -> str:
    """`inputs/{channel}_all.{ext}` (one slice for every sample), `inputs/{channel}_{i:04d}.{ext}`
    (sample i's own file) or `inputs/{channel}_{first:04d}-{last:04d}.{ext}` (a volume, slice k
    for sample k)."""
    if applies == "all":
        which = "all"
    elif applies == "each":
        which = sample_label(samples[0])
    else:
        which = f"{sample_label(samples[0])}-{sample_label(samples[-1])}"
    return f"{INPUTS_DIR}/{channel}_{which}.{ext}"


def part_path(directory: Path, index: int) -> Path:
    """The part file whose presence marks sample `index` as complete."""
    return directory / PARTS_DIR / f"{sample_label(index)}.npz"


def write_expiry(directory: Path, expires_at: float) -> None:
    (directory / EXPIRY_MARKER).write_text(str(expires_at))


def read_expiry(directory: Path) -> float | None:
    """The directory's expiry time, or None when it has no readable marker (not finalised)."""
    try:
        return float((directory / EXPIRY_MARKER).read_text())
    except (OSError, ValueError):
        return None


@dataclass(frozen=True)
class RunNames:
    """Names that differ between a service job and a local `synthmri sample` run."""

    prefix: str  # of the per-sample files
    npz: str
    archive: str

    @classmethod
    def job(cls, job_id: str) -> RunNames:
        return cls(prefix=job_id, npz=JOB_NPZ, archive=JOB_ARCHIVE)

    @classmethod
    def local(cls, name: str) -> RunNames:
        """`synthmri sample --name NAME`: the user's name prefixes the samples, npz and zip."""
        return cls(prefix=name, npz=f"{name}.npz", archive=f"{name}.zip")
