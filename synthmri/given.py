"""Known channels uploaded with a job: read, check and normalise them (numpy, nibabel, Pillow; no torch).

A client may send, per channel of the model, the slices that samples must keep (a tumour
mask, a T1CE slice); the model generates the other channels to match (model.conditioning).
The API, the client and both CLIs share this module, so a file is judged the same way
wherever it is given, and every refusal is a `GivenError` naming the channel and what to
change.

Per channel a job takes one file (its slice is given to every sample), `count` files (one
per sample, in order) or one NIfTI volume with `count` slices along its last axis (slice k
for sample k, in stored order). A file is a NIfTI-1/2 (`.nii`, `.nii.gz`) or an 8- or 16-bit
grayscale PNG, recognised by its bytes. Arrays are brought into the outputs' layout:

- NIfTI: the in-plane axes are flipped or swapped to the outputs' orientation (the affine of
  synthmri.outputs.writers, LPS); the last axis must be the axial one; oblique affines are
  refused (resampling would change the values). A NIfTI without qform/sform is taken as stored.
- PNG: transposed, as the service writes PNGs (rows = the NIfTI's second axis).

Values: a seg holds BraTS labels {0, 1, 2, 4} (a PNG seg as pixel values) and is encoded to
the model's label levels. An image already in [0, 1] (what the service writes) is taken as
it is, an 8-bit PNG as value/255; anything else gets the model's training rule
(synthmri.intensity, over the file's non-zero voxels).
"""

from __future__ import annotations

import gzip
import hashlib
import io
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from synthmri.atomic import atomic_write
from synthmri.channels import (
    BRATS_LABELS,
    CHANNEL_SETS,
    DEFAULT_LABEL_LEVELS,
    MODALITIES,
    SEG,
    channels_of,
    encode_labels,
)
from synthmri.contract import DEFAULT_GUIDANCE, Given, GivenApplies, GivenInput
from synthmri.intensity import normalise_percentile, research_uint8
from synthmri.outputs.layout import KNOWN_VALUES, input_filename

# Header bytes beyond the pixel data that a decompressed NIfTI may hold (extensions included).
HEADER_ALLOWANCE = 1 << 20
# An affine column is axis-aligned when its other components are below this share of its length.
OBLIQUE_TOLERANCE = 1e-3


class GivenError(ValueError):
    """A known-channel upload that cannot be used: `field` is its form field (a channel name, or
    `guidance`), the message says what to change."""

    def __init__(self, field: str, detail: str) -> None:
        super().__init__(detail)
        self.field = field
        self.detail = detail


@dataclass(frozen=True)
class Upload:
    """One file as received: the channel it is for, the client's file name (shown in messages
    only, never used as a path) and its bytes."""

    channel: str
    name: str
    data: bytes

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.data).hexdigest()


@dataclass(frozen=True)
class ModelSlices:
    """What a known channel must fit: the model's channels, slice size, intensity rule and label levels."""

    name: str
    channels: tuple[str, ...]
    image_size: int
    normalisation: str = "percentile"
    low_percentile: float = 0.5
    high_percentile: float = 99.5
    label_levels: Mapping[int, float] = field(default_factory=lambda: dict(DEFAULT_LABEL_LEVELS))

    @classmethod
    def from_config(cls, name: str, config: Mapping[str, Any]) -> ModelSlices:
        """From a checkpoint's config.json (as parsed JSON)."""
        norm = config.get("normalisation") or {}
        levels = config.get("label_levels") or DEFAULT_LABEL_LEVELS
        return cls(
            name=name, channels=channels_of(config["channel_set"]),
            image_size=int(config["model"]["image_size"]),
            normalisation=str(norm.get("method", "percentile")),
            low_percentile=float(norm.get("low_percentile", 0.5)),
            high_percentile=float(norm.get("high_percentile", 99.5)),
            label_levels={int(k): float(v) for k, v in dict(levels).items()},
        )  # fmt: skip


@dataclass(frozen=True)
class Slices:
    """An upload read into (H, W, n) slices in the outputs' layout."""

    array: np.ndarray
    ext: str  # "nii.gz", "nii" or "png": how it is stored under inputs/
    png_bits: int | None  # 8 or 16 for a PNG, None for a NIfTI
    orientation: str


@dataclass(frozen=True)
class GivenFile:
    """An accepted upload and what it was turned into."""

    upload: Upload
    slices: Slices
    applies: GivenApplies
    samples: list[int]
    normalisation: str

    @property
    def path(self) -> str:
        """Where it is kept, relative to the job (or run) directory."""
        return input_filename(self.upload.channel, self.applies, self.samples, self.slices.ext)

    def record(self) -> GivenInput:
        return GivenInput(
            channel=self.upload.channel, file=self.path, sha256=self.upload.sha256, applies=self.applies,
            samples=self.samples, normalisation=self.normalisation, orientation=self.slices.orientation,
        )  # fmt: skip


@dataclass(frozen=True)
class GivenChannels:
    """The known channels of a job, checked: model-range values and the files they came from
    (model.conditioning.KnownChannels is what samples with them)."""

    values: dict[str, np.ndarray]  # channel → (1 or count, H, W) float32 in the model range
    files: list[GivenFile]
    channels: list[str]  # in model order
    guidance: float

    def record(self) -> Given:
        return Given(channels=self.channels, guidance=self.guidance, inputs=[f.record() for f in self.files])

    def write(self, directory: Path) -> None:
        """The uploads as sent, and the values the sampler reads, under `directory`/inputs/."""
        for f in self.files:
            atomic_write(_inside(directory, f.path), f.upload.data)
        buf = io.BytesIO()
        np.savez(buf, **self.values)  # type: ignore[arg-type]
        atomic_write(_inside(directory, KNOWN_VALUES), buf.getvalue())


def _inside(directory: Path, relative: str) -> Path:
    path = directory / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


# ---------------------------------------------------------------------------
# reading one file


def file_kind(data: bytes) -> str | None:
    """"nii.gz", "nii" or "png" from the leading bytes, else None."""
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if data.startswith(b"\x1f\x8b"):
        return "nii.gz"
    if _nifti_header_size(data) is not None:
        return "nii"
    return None


def _nifti_header_size(data: bytes) -> int | None:
    """348 (NIfTI-1) or 540 (NIfTI-2) when `data` starts with a single-file NIfTI header."""
    if len(data) < 348:
        return None
    for order in "<>":
        (size,) = struct.unpack(order + "i", data[:4])
        if size == 348 and data[344:348] == b"n+1\x00":
            return 348
        if size == 540 and data[4:8] == b"n+2\x00":
            return 540
    return None


def read_slices(upload: Upload, image_size: int, max_slices: int) -> Slices:
    """The upload as (H, W, n) slices in the outputs' layout; GivenError if it is not usable."""
    kind = file_kind(upload.data)
    if kind == "png":
        return _read_png(upload, image_size)
    if kind is None:
        raise GivenError(upload.channel, f"{_what(upload)} is neither a NIfTI (.nii, .nii.gz) nor a PNG file")
    raw = upload.data
    if kind == "nii.gz":
        raw = _gunzip(upload, HEADER_ALLOWANCE + image_size * image_size * max_slices * 8)
        if _nifti_header_size(raw) is None:
            raise GivenError(upload.channel, f"{_what(upload)} is gzip-compressed but holds no NIfTI image")
    return _read_nifti(upload, raw, kind, image_size, max_slices)


def _what(upload: Upload) -> str:
    name = upload.name[:60] or "the file"
    return f"{upload.channel} file {name!r}"


def _gunzip(upload: Upload, limit: int) -> bytes:
    try:
        with gzip.GzipFile(fileobj=io.BytesIO(upload.data)) as f:
            raw = f.read(limit + 1)
    except (OSError, EOFError) as e:
        raise GivenError(upload.channel, f"{_what(upload)} is not a readable gzip file ({e})") from None
    if len(raw) > limit:
        raise GivenError(upload.channel, f"{_what(upload)} unpacks to more than {limit} bytes, more than the "
                         "slices this job can take; send only the slices the job uses")  # fmt: skip
    return raw


def _read_nifti(upload: Upload, raw: bytes, ext: str, image_size: int, max_slices: int) -> Slices:
    import nibabel as nib

    cls = nib.Nifti1Image if _nifti_header_size(raw) == 348 else nib.Nifti2Image
    try:
        img = cls.from_bytes(raw)
        shape = tuple(int(n) for n in img.header.get_data_shape())
    except Exception as e:  # nibabel raises several types for a damaged header
        reason = f"{_what(upload)} is not a readable NIfTI ({type(e).__name__})"
        raise GivenError(upload.channel, reason) from None
    while len(shape) > 3 and shape[-1] == 1:
        shape = shape[:-1]
    if len(shape) not in (2, 3):
        raise GivenError(upload.channel, f"{_what(upload)} has shape {'×'.join(map(str, shape))}: send a 2-D "
                         f"slice ({image_size}×{image_size} or {image_size}×{image_size}×1) or a volume of "
                         f"{image_size}×{image_size}×count slices")  # fmt: skip
    _check_size(upload, shape[:2], image_size)
    if len(shape) == 3 and shape[2] > max_slices:
        raise GivenError(upload.channel, f"{_what(upload)} has {shape[2]} slices but the job has "
                         f"{max_slices} samples; send one slice, or one slice per sample")  # fmt: skip
    transform, orientation = _to_output_orientation(upload, img)
    try:
        data = np.asarray(img.get_fdata(dtype=np.float64)).reshape(*shape[:2], -1)
    except Exception as e:
        raise GivenError(upload.channel, f"{_what(upload)} holds data that cannot be read as numbers "
                         f"({type(e).__name__})") from None  # fmt: skip
    if transform is not None:
        data = nib.orientations.apply_orientation(data, transform)
    return Slices(np.ascontiguousarray(data), ext, None, orientation)


def _check_size(upload: Upload, in_plane: Sequence[int], image_size: int) -> None:
    if tuple(in_plane) != (image_size, image_size):
        raise GivenError(upload.channel, f"{_what(upload)} has {in_plane[0]}×{in_plane[1]} slices but the "
                         f"model works on {image_size}×{image_size}; resample or crop it to "
                         f"{image_size}×{image_size}")  # fmt: skip


def _to_output_orientation(upload: Upload, img: Any) -> tuple[np.ndarray | None, str]:
    """The axis flips/swaps that bring the image to the outputs' orientation, and what they were.

    The slice axis keeps its stored order (sample k is slice k), so only the in-plane axes move.
    """
    import nibabel as nib

    from synthmri.outputs.writers import AFFINE

    hdr = img.header
    if int(hdr["sform_code"]) == 0 and int(hdr["qform_code"]) == 0:
        return None, "no orientation in the header: axes taken as stored"
    affine = np.asarray(img.affine, dtype=np.float64)[:3, :3]
    lengths = np.linalg.norm(affine, axis=0)
    if not np.all(lengths > 0):
        raise GivenError(upload.channel, f"{_what(upload)} has a degenerate affine (a zero voxel size)")
    directions = np.abs(affine / lengths)
    if np.any(np.sort(directions, axis=0)[-2] > OBLIQUE_TOLERANCE):
        raise GivenError(upload.channel, f"{_what(upload)} is oblique (its axes are not the scanner axes); "
                         "resample it to an axis-aligned grid first")  # fmt: skip
    source = nib.orientations.io_orientation(img.affine)
    target = nib.orientations.io_orientation(AFFINE)
    codes = "".join(nib.orientations.ornt2axcodes(source))
    wanted = "".join(nib.orientations.ornt2axcodes(target))
    transform = nib.orientations.ornt_transform(source, target)
    if int(transform[2, 0]) != 2:
        raise GivenError(upload.channel, f"{_what(upload)} is oriented {codes}: its last axis is not the "
                         f"axial one; send axial slices (the outputs are {wanted})")  # fmt: skip
    transform[2, 1] = 1  # keep the stored slice order
    if np.array_equal(transform, [[0, 1], [1, 1], [2, 1]]):
        return None, f"{codes} (as the outputs)"
    return transform, f"{codes} → {wanted[:2]}{codes[2]} (in-plane axes flipped/swapped, lossless)"


def _read_png(upload: Upload, image_size: int) -> Slices:
    from PIL import Image

    try:
        with Image.open(io.BytesIO(upload.data)) as im:
            _check_size(upload, im.size, image_size)  # (x, y) = the NIfTI axes, since PNGs are transposed
            mode = im.mode
            if mode not in ("L", "I;16", "I;16B", "I;16L", "I"):
                raise GivenError(upload.channel, f"{_what(upload)} is a {mode} PNG; send an 8- or 16-bit "
                                 "grayscale PNG (a seg PNG holds the labels 0, 1, 2, 4 as pixel values; "
                                 "the service's colour seg PNGs are previews: send its seg NIfTI "
                                 "instead)")  # fmt: skip
            pixels = np.asarray(im)
    except GivenError:
        raise
    except Exception as e:  # Pillow raises several types for a damaged file
        reason = f"{_what(upload)} is not a readable PNG ({type(e).__name__})"
        raise GivenError(upload.channel, reason) from None
    bits = 8 if mode == "L" else 16
    array = np.ascontiguousarray(pixels.T.astype(np.float64))[:, :, None]
    return Slices(array, "png", bits, f"{bits}-bit PNG, transposed (the service's PNG layout)")


# ---------------------------------------------------------------------------
# values


def to_model_range(slices: Slices, channel: str, model: ModelSlices, what: str) -> tuple[np.ndarray, str]:
    """(n, H, W) float32 in the model range, and how the values were mapped."""
    a = slices.array
    if not np.all(np.isfinite(a)):
        raise GivenError(channel, f"{what} contains NaN or infinite values")
    if channel == SEG:
        return _encode_seg(a, channel, model, what)
    if slices.png_bits == 8:
        unit, how = a / 255.0, "8-bit PNG: value / 255"
    elif a.min() >= 0.0 and a.max() <= 1.0:
        unit, how = a, "as uploaded (already in [0, 1])"
    elif model.normalisation == "research":
        unit = research_uint8(np.clip(a, 0.0, None)) / 255.0
        how = "the model's training rule (research): uint8(value / max · 255) / 255"
    else:
        lo, hi = model.low_percentile, model.high_percentile
        unit = (normalise_percentile(a, a != 0, lo, hi) + 1.0) / 2.0
        how = (f"the model's training rule: clipped to the {lo:g}–{hi:g}th percentiles of the file's "
               "non-zero voxels and scaled to [0, 1] (zero voxels are background)")  # fmt: skip
    values = (np.asarray(unit, dtype=np.float64) * 2.0 - 1.0).astype(np.float32)
    return np.ascontiguousarray(np.moveaxis(values, 2, 0)), how


def _encode_seg(a: np.ndarray, channel: str, model: ModelSlices, what: str) -> tuple[np.ndarray, str]:
    if not np.array_equal(a, np.round(a)):
        raise GivenError(channel, f"{what} is not integer-valued; a seg holds the BraTS labels 0, 1, 2, 4")
    labels = np.round(a).astype(np.int64)
    found = set(np.unique(labels).tolist())
    unknown = sorted(found - set(BRATS_LABELS))
    if unknown:
        hint = " (BraTS 2023 numbers the enhancing tumour 3: map 3 → 4)" if unknown == [3] else ""
        labels_text = f"labels {unknown[:8]} outside the BraTS labels 0, 1, 2, 4"
        raise GivenError(channel, f"{what} has {labels_text}{hint}")
    values = encode_labels(labels, model.label_levels)
    levels = ", ".join(f"{k} → {v:.3g}" for k, v in model.label_levels.items())
    return np.ascontiguousarray(np.moveaxis(values, 2, 0)), f"BraTS labels as the model's levels ({levels})"


# ---------------------------------------------------------------------------
# a job's uploads


def resolve_guidance(guidance: float | None, given: bool) -> float:
    """The request's guidance, or the default when channels are given; an error without files."""
    if not given:
        if guidance is not None:
            raise GivenError("guidance", "guidance applies to known channels: send them as files (multipart "
                             "form fields named after channels) or leave guidance out")  # fmt: skip
        return 0.0
    return DEFAULT_GUIDANCE if guidance is None else float(guidance)


def check_channels(names: Sequence[str], model: ModelSlices, outputs: Sequence[str]) -> list[str]:
    """The given channels in model order: each one a channel of the model, and not every output."""
    for name in names:
        if name not in model.channels:
            raise GivenError(name, f"model {model.name!r} has no channel {name[:40]!r}; its channels are "
                             f"{', '.join(model.channels)}")  # fmt: skip
    given = [c for c in model.channels if c in names]
    if given and set(outputs) <= set(given):
        raise GivenError(given[0], f"nothing left to generate: {', '.join(given)} given and the job outputs "
                         f"{', '.join(outputs)}; leave out at least one channel to generate, or request "
                         "more channels")  # fmt: skip
    return given


def channel_set_with(requested: str | None, given: Sequence[str]) -> str | None:
    """The channel set a request by channel set needs: the requested one, or the smallest set that
    also has the given channels (a mask given to a T1CE-only request needs a model with a mask).
    Unchanged when no set has them all (the model's own check then names the channel)."""
    if requested is None or set(given) <= set(CHANNEL_SETS[requested]):
        return requested
    needed = set(CHANNEL_SETS[requested]) | set(given)
    fitting = sorted((len(chs), name) for name, chs in CHANNEL_SETS.items() if needed <= set(chs))
    return fitting[0][1] if fitting else requested


def prepare_known(
    uploads: Sequence[Upload],
    model: ModelSlices,
    *,
    count: int,
    outputs: Sequence[str],
    guidance: float | None,
) -> GivenChannels | None:
    """Check a job's uploads (see the module docstring); None when there are none."""
    by_channel: dict[str, list[Upload]] = {}
    for u in uploads:
        by_channel.setdefault(u.channel, []).append(u)
    weight = resolve_guidance(guidance, bool(by_channel))
    if not by_channel:
        return None
    channels = check_channels(list(by_channel), model, outputs)
    values: dict[str, np.ndarray] = {}
    files: list[GivenFile] = []
    for channel in channels:
        group = by_channel[channel]
        if len(group) not in (1, count):
            raise GivenError(channel, f"{len(group)} {channel} files for a job of {count} samples: send one "
                             f"(given to every sample), {count} (one per sample, in order) or one NIfTI "
                             f"volume with {count} slices along its last axis")  # fmt: skip
        parts = []
        for k, upload in enumerate(group):
            slices = read_slices(upload, model.image_size, count)
            n = slices.array.shape[2]
            if len(group) > 1 and n != 1:
                raise GivenError(channel, f"{_what(upload)} has {n} slices; with one file per sample each "
                                 "file holds one slice")  # fmt: skip
            if n not in (1, count):
                raise GivenError(channel, f"{_what(upload)} has {n} slices along its last axis for a job "
                                 f"of {count} samples: send one slice (given to every sample) or "
                                 f"{count}")  # fmt: skip
            value, how = to_model_range(slices, channel, model, _what(upload))
            applies: GivenApplies
            if len(group) > 1:
                applies, samples = "each", [k]
            elif n > 1:
                applies, samples = "slices", list(range(count))
            else:
                applies, samples = "all", list(range(count))
            files.append(GivenFile(upload, slices, applies, samples, how))
            parts.append(value)
        values[channel] = np.concatenate(parts).astype(np.float32)
    return GivenChannels(values, files, channels, weight)


def load_known(directory: Path, given: Given, channels: Sequence[str], indices: Sequence[int]) -> np.ndarray:
    """(len(indices), C, H, W) float32 model-range rows of a job's stored known values."""
    with np.load(directory / KNOWN_VALUES) as stored:
        return known_rows({c: stored[c] for c in given.channels}, channels, indices)


def known_rows(
    values: Mapping[str, np.ndarray], channels: Sequence[str], indices: Sequence[int]
) -> np.ndarray:
    """(len(indices), C, H, W) rows from per-channel (1 or count, H, W) values (other channels zero)."""
    size = next(iter(values.values())).shape[-1]
    out = np.zeros((len(indices), len(channels), size, size), dtype=np.float32)
    for c, name in enumerate(channels):
        if name in values:
            v = values[name]
            out[:, c] = v[0] if len(v) == 1 else v[list(indices)]
    return out


def array_upload(channel: str, array: np.ndarray, name: str | None = None) -> Upload:
    """An in-memory slice (H, W) or volume (H, W, n) as a NIfTI upload in the outputs' orientation
    (float32 images, uint8 seg), as a client sends arrays."""
    import nibabel as nib

    from synthmri.outputs.writers import AFFINE, NIFTI_XFORM_SCANNER_ANAT

    a = np.asarray(array)
    if a.ndim == 2:
        a = a[:, :, None]
    if a.ndim != 3:
        raise GivenError(channel, f"a {channel} array must be (H, W) or (H, W, count), got shape {a.shape}")
    data = a.astype(np.uint8) if channel == SEG and np.array_equal(a, np.round(a)) else a.astype(np.float32)
    img = nib.Nifti1Image(data, AFFINE)
    img.set_qform(AFFINE, code=NIFTI_XFORM_SCANNER_ANAT)
    img.set_sform(AFFINE, code=NIFTI_XFORM_SCANNER_ANAT)
    return Upload(channel, name or f"{channel}.nii.gz", gzip.compress(img.to_bytes(), mtime=0))


# ---------------------------------------------------------------------------
# what a client or a CLI hands over

GivenValue = Any  # a path, bytes, an (H, W) or (H, W, count) array, or a list of those (one per sample)


def uploads_from(given: Mapping[str, GivenValue]) -> list[Upload]:
    """Uploads from {channel: value}: a file path or its bytes, an array (a slice for every sample, or
    a volume of one slice per sample), or a list of those, one per sample in order."""
    uploads: list[Upload] = []
    for channel, value in given.items():
        items = list(value) if isinstance(value, list | tuple) else [value]
        if not items:
            raise GivenError(channel, f"no {channel} file given")
        for k, item in enumerate(items):
            name = f"{channel}_{k}" if len(items) > 1 else channel
            if isinstance(item, np.ndarray):
                uploads.append(array_upload(channel, item, f"{name}.nii.gz"))
            elif isinstance(item, bytes):
                uploads.append(Upload(channel, name, item))
            elif isinstance(item, str | Path):
                try:
                    uploads.append(Upload(channel, Path(item).name, Path(item).read_bytes()))
                except OSError as e:
                    raise GivenError(channel, f"cannot read {channel} file {str(item)!r} "
                                     f"({e.strerror or type(e).__name__})") from None  # fmt: skip
            else:
                raise GivenError(channel, f"a {channel} value must be a file path, bytes or an array, "
                                 f"not {type(item).__name__}")  # fmt: skip
    return uploads


def parse_given_options(options: Sequence[str]) -> dict[str, list[Path]]:
    """`--given CHANNEL=PATH` options (repeated: one file per sample, in order) → {channel: paths}."""
    given: dict[str, list[Path]] = {}
    for option in options:
        channel, sep, path = option.partition("=")
        channel = channel.strip().lower()
        if not sep or not path:
            raise GivenError(option, f"--given {option!r}: write CHANNEL=FILE, e.g. --given seg=mask.nii.gz")
        if channel not in (*MODALITIES, SEG):
            raise GivenError(channel, f"--given {option!r}: unknown channel {channel!r}; use one of "
                             f"{', '.join((*MODALITIES, SEG))}")  # fmt: skip
        if not Path(path).is_file():
            raise GivenError(channel, f"--given {option!r}: no such file {path!r}")
        given.setdefault(channel, []).append(Path(path))
    return given
