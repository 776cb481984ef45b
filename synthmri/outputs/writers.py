"""Output writers: per-sample NIfTI and PNG, the grid PNG, manifest.json, .npz and the zip.

Every file goes through `synthmri.atomic.atomic_write`, so a crashed or duplicated task
never leaves half a file. Compressed outputs carry no timestamps, so a re-run writes
identical bytes. Torch-free: arrays come in as numpy.
"""

from __future__ import annotations

import functools
import io
import json
import math
import struct
import zipfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
from isal import igzip, isal_zlib
from PIL import Image, ImageDraw, ImageFont

from synthmri.atomic import atomic_write
from synthmri.channels import LABEL_NAMES, SEG
from synthmri.outputs.layout import (
    FORMAT_EXTENSIONS,
    GRID,
    MANIFEST,
    RunNames,
    sample_filename,
    sample_label,
)

# Output orientation: array axis 0 = x, axis 1 = y of a BraTS volume as nibabel loads it
# (see docs/INTERFACES.md); diag(-1, -1, 1) is the BraTS/LPS-style 1 mm grid.
AFFINE = np.diag([-1.0, -1.0, 1.0, 1.0])
NIFTI_XFORM_SCANNER_ANAT = 1

# Label colours (RGB) for seg PNGs and the grid overlay; 0 (background) stays transparent.
LABEL_COLOURS: dict[int, tuple[int, int, int]] = {1: (230, 40, 40), 2: (40, 200, 70), 4: (255, 210, 0)}
OVERLAY_ALPHA = 0.6

MANIFEST_FORMAT = "synthmri-manifest/1"

# ISA-L's fastest deflate level (of 0-3; 0 hardly compresses).
FAST = 1


# ---------------------------------------------------------------------------
# NIfTI


@functools.lru_cache(maxsize=64)
def _nifti_header(channel: str, shape: tuple[int, ...], dtype: np.dtype[Any]) -> bytes:
    """The header bytes (up to the data offset) of a single-slice NIfTI-1 of `channel`."""
    if channel == SEG:
        cal = (0.0, 4.0)
        descrip = "SynthMRI synthetic seg: BraTS labels 0,1 NCR,2 ED,4 ET"
    else:
        cal = (0.0, 1.0)
        descrip = f"SynthMRI synthetic {channel}, intensity in [0,1]"
    nii = nib.Nifti1Image(np.zeros(shape, dtype=dtype), AFFINE)
    hdr = nii.header
    hdr.set_data_dtype(dtype)
    nii.set_qform(AFFINE, code=NIFTI_XFORM_SCANNER_ANAT)
    nii.set_sform(AFFINE, code=NIFTI_XFORM_SCANNER_ANAT)
    hdr.set_xyzt_units(xyz="mm")
    hdr["descrip"] = descrip.encode()[:79]
    hdr["cal_min"], hdr["cal_max"] = cal
    whole = nii.to_bytes()
    return whole[: len(whole) - math.prod(shape) * dtype.itemsize]


def nifti_bytes(img: np.ndarray, channel: str) -> bytes:
    """A gzipped single-slice NIfTI-1 of shape (H, W, 1): seg as uint8 labels, images float32.

    Every slice of a channel shares one header, built once by nibabel; the voxels follow it in
    NIfTI's column-major order (what nibabel itself writes, byte for byte, and ~10x faster than
    building an image per slice). Compressed by ISA-L at its fast level: standard gzip that every
    reader opens, 5x faster than zlib's level 1 for the same size on float slices, and the time
    it takes is time the client waits.
    """
    img = np.asarray(img)
    if img.ndim != 2:
        raise ValueError(f"expected a 2-D slice for {channel!r}, got shape {img.shape}")
    data = (img.astype(np.uint8) if channel == SEG else img.astype(np.float32))[:, :, None]
    header = _nifti_header(channel, data.shape, data.dtype)
    # mtime=0: identical bytes on every re-run, so duplicate tasks are indistinguishable.
    return igzip.compress(header + data.tobytes(order="F"), FAST, mtime=0)


def write_nifti(path: str | Path, img: np.ndarray, channel: str, durable: bool = True) -> Path:
    return atomic_write(path, nifti_bytes(img, channel), durable=durable)


# ---------------------------------------------------------------------------
# PNG


def to_display(img: np.ndarray) -> np.ndarray:
    """(H, W) float image in [0, 1] → 8-bit display array, transposed (anterior up)."""
    return (np.clip(np.asarray(img, dtype=np.float32), 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8).T


def label_rgb(seg: np.ndarray) -> np.ndarray:
    """(H, W) BraTS labels → transposed (W, H, 3) colour label map on black."""
    seg_t = np.asarray(seg).T
    rgb = np.zeros((*seg_t.shape, 3), dtype=np.uint8)
    for label, colour in LABEL_COLOURS.items():
        rgb[seg_t == label] = colour
    return rgb


def overlay_rgb(base: np.ndarray | None, seg: np.ndarray) -> np.ndarray:
    """Seg labels blended over a grey image (both (H, W), result transposed (W, H, 3))."""
    seg_t = np.asarray(seg).T
    grey = to_display(base) if base is not None else np.zeros(seg_t.shape, dtype=np.uint8)
    rgb = np.repeat(grey[:, :, None], 3, axis=2).astype(np.float32)
    for label, colour in LABEL_COLOURS.items():
        mask = seg_t == label
        rgb[mask] = (1.0 - OVERLAY_ALPHA) * rgb[mask] + OVERLAY_ALPHA * np.array(colour, dtype=np.float32)
    return (rgb + 0.5).astype(np.uint8)


_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_PNG_COLOUR_TYPES = {1: 0, 3: 2, 4: 6}  # samples per pixel → grey, RGB, RGBA
_PNG_FILTER_UP = 2


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    crc = isal_zlib.crc32(data, isal_zlib.crc32(kind))
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)


def png_bytes(array: np.ndarray) -> bytes:
    """An 8-bit grey (H, W), RGB or RGBA (H, W, C) array as a PNG.

    Every row uses PNG's Up filter (the difference to the row above) and ISA-L's fast deflate.
    Pillow tries all five filters on every row and has no way to choose one: for a job's grid
    that search alone took longer than deflating. Grids are nearest-neighbour upscaled, so Up
    turns every repeated row into zeros; a 16-sample five-channel grid encodes in 9 ms instead of
    Pillow's 65 ms (at level 1), for a file 1.6x the size. The client waits for these files.
    """
    a = np.asarray(array)
    if a.dtype != np.uint8 or a.ndim not in (2, 3) or (a.ndim == 3 and a.shape[2] not in _PNG_COLOUR_TYPES):
        raise ValueError(f"expected an 8-bit (H, W) or (H, W, 1|3|4) image, got {a.dtype} {a.shape}")
    height, width = a.shape[:2]
    per_pixel = 1 if a.ndim == 2 else a.shape[2]
    rows = a.reshape(height, width * per_pixel)
    filtered = np.empty((height, 1 + rows.shape[1]), dtype=np.uint8)
    filtered[:, 0] = _PNG_FILTER_UP
    filtered[0, 1:] = rows[0]  # the row above the first is zeros
    np.subtract(rows[1:], rows[:-1], out=filtered[1:, 1:])  # modulo 256, as PNG defines it
    header = struct.pack(">IIBBBBB", width, height, 8, _PNG_COLOUR_TYPES[per_pixel], 0, 0, 0)
    return b"".join((
        _PNG_SIGNATURE,
        _png_chunk(b"IHDR", header),
        _png_chunk(b"IDAT", isal_zlib.compress(filtered.tobytes(), FAST)),
        _png_chunk(b"IEND", b""),
    ))  # fmt: skip


def channel_png(img: np.ndarray, channel: str) -> bytes:
    """PNG of one channel: grey 8-bit image, or the seg as a colour label map."""
    return png_bytes(label_rgb(img) if channel == SEG else to_display(img))


def write_png(path: str | Path, img: np.ndarray, channel: str, durable: bool = True) -> Path:
    return atomic_write(path, channel_png(img, channel), durable=durable)


def write_sample(
    out_dir: str | Path,
    prefix: str,
    index: int,
    sample: Mapping[str, np.ndarray],
    formats: Sequence[str] = tuple(FORMAT_EXTENSIONS),
    durable: bool = True,
) -> list[Path]:
    """A file per channel and format of one decoded sample (names as `layout.sample_files`);
    returns the paths written (`durable=False`: see `atomic_write`)."""
    out_dir = Path(out_dir)
    writers = {"nifti": write_nifti, "png": write_png}
    written: list[Path] = []
    for channel, img in sample.items():
        for fmt, ext in FORMAT_EXTENSIONS.items():
            if fmt in formats:
                path = out_dir / sample_filename(prefix, index, channel, ext)
                written.append(writers[fmt](path, img, channel, durable))
    return written


# ---------------------------------------------------------------------------
# Grid


@dataclass(frozen=True)
class GridLayout:
    """Where each cell of a grid PNG lies (pixels), so callers and tests can find it."""

    rows: int
    cols: int
    cell: int  # cell edge in pixels (the slice upscaled by an integer factor)
    scale: int
    left: int  # x of the first column (after the row-label gutter)
    top: int  # y of the first row (after the header)
    pad: int
    width: int
    height: int

    def cell_box(self, row: int, col: int) -> tuple[int, int, int, int]:
        """(x0, y0, x1, y1) of a cell, x1/y1 exclusive."""
        x0 = self.left + col * (self.cell + self.pad)
        y0 = self.top + row * (self.cell + self.pad)
        return x0, y0, x0 + self.cell, y0 + self.cell


_BG = (20, 20, 24)
_FG = (235, 235, 235)


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow without FreeType: the fixed bitmap font
        return ImageFont.load_default()


def _base_channel(channels: Sequence[str]) -> str | None:
    """The image the seg is drawn over: T1CE when present, else the first image channel."""
    images = [c for c in channels if c != SEG]
    return "t1ce" if "t1ce" in images else (images[0] if images else None)


def render_grid(
    samples: Sequence[Mapping[str, np.ndarray]],
    channels: Sequence[str],
    row_labels: Sequence[str] | None = None,
    min_cell: int = 128,
) -> tuple[Image.Image, GridLayout]:
    """Rows = samples, columns = channels; the seg column is a colour overlay on T1CE."""
    if not samples:
        raise ValueError("a grid needs at least one sample")
    size = int(np.asarray(samples[0][channels[0]]).shape[0])
    scale = max(1, math.ceil(min_cell / size))
    cell, pad = size * scale, 4
    font = _font(14)
    header, gutter = 24, 56
    has_seg = SEG in channels
    legend = 24 if has_seg else 0
    width = gutter + len(channels) * (cell + pad)
    height = header + len(samples) * (cell + pad) + legend
    layout = GridLayout(len(samples), len(channels), cell, scale, gutter, header, pad, width, height)

    canvas = Image.new("RGB", (width, height), _BG)
    draw = ImageDraw.Draw(canvas)
    base_name = _base_channel(channels)
    for col, name in enumerate(channels):
        x0, _, _, _ = layout.cell_box(0, col)
        title = f"seg on {base_name}" if name == SEG and base_name else name
        draw.text((x0 + 4, 5), title, fill=_FG, font=font)
    for row, sample in enumerate(samples):
        _, y0, _, _ = layout.cell_box(row, 0)
        row_label = row_labels[row] if row_labels is not None else str(row)
        draw.text((4, y0 + 4), row_label, fill=_FG, font=font)
        for col, name in enumerate(channels):
            if name == SEG:
                arr = overlay_rgb(sample.get(base_name) if base_name else None, sample[SEG])
            else:
                arr = to_display(sample[name])
            up = arr.repeat(scale, axis=0).repeat(scale, axis=1)  # nearest-neighbour upscaling
            x0, y0, _, _ = layout.cell_box(row, col)
            canvas.paste(Image.fromarray(up), (x0, y0))
    if has_seg:
        x, y = gutter, height - legend + 5
        for label, colour in LABEL_COLOURS.items():
            draw.rectangle((x, y, x + 12, y + 12), fill=colour)
            text = f"{label} {LABEL_NAMES[label]}"
            draw.text((x + 16, y - 1), text, fill=_FG, font=font)
            x += 16 + int(draw.textlength(text, font=font)) + 14
    return canvas, layout


def write_grid(
    path: str | Path,
    samples: Sequence[Mapping[str, np.ndarray]],
    channels: Sequence[str],
    row_labels: Sequence[str] | None = None,
) -> GridLayout:
    """Render the grid PNG (see `render_grid`) and write it atomically; returns its layout."""
    data, layout = grid_png(samples, channels, row_labels)
    atomic_write(path, data)
    return layout


def grid_png(
    samples: Sequence[Mapping[str, np.ndarray]],
    channels: Sequence[str],
    row_labels: Sequence[str] | None = None,
) -> tuple[bytes, GridLayout]:
    """The grid PNG's bytes (see `render_grid`) and its layout."""
    image, layout = render_grid(samples, channels, row_labels)
    return png_bytes(np.asarray(image)), layout


# ---------------------------------------------------------------------------
# manifest, npz, zip


def make_manifest(
    *,
    seed: int,
    sampler: str,
    steps: int,
    sha256: str,
    model: str,
    channel_set: str,
    channels: Sequence[str],
    image_size: int,
    indices: Sequence[int],
    files: Sequence[str],
    timings: Mapping[str, float],
    version: str,
    **extra: Any,
) -> dict[str, Any]:
    """The manifest dict shared by `synthmri sample` and the worker (JSON-serialisable)."""
    return {
        "format": MANIFEST_FORMAT,
        "version": version,
        "model": model,
        "sha256": sha256,
        "channel_set": channel_set,
        "channels": list(channels),
        "image_size": int(image_size),
        "seed": int(seed),
        "sampler": sampler,
        "steps": int(steps),
        "count": len(indices),
        "indices": [int(i) for i in indices],
        "timings": {k: round(float(v), 4) for k, v in timings.items()},
        "files": list(files),
        **extra,
    }


def write_manifest(path: str | Path, manifest: Mapping[str, Any]) -> Path:
    """The manifest as sorted, indented JSON (stable bytes for the same content)."""
    text = json.dumps(manifest, indent=2, sort_keys=True) + "\n"
    return atomic_write(path, text.encode("utf-8"))


def research_array(x: np.ndarray) -> np.ndarray:
    """(N, C, H, W) in [-1, 1] → (N, H, W, C) uint8, the research scripts' sample layout."""
    x = np.asarray(x, dtype=np.float32)
    if x.ndim != 4:
        raise ValueError(f"expected (N, C, H, W) samples, got shape {x.shape}")
    u8 = np.clip(np.rint((x + 1.0) * 127.5), 0, 255).astype(np.uint8)
    return np.ascontiguousarray(u8.transpose(0, 2, 3, 1))


def write_npz(path: str | Path, x: np.ndarray) -> Path:
    """All samples as key `arr_0` (N×H×W×C uint8), as the research sampling scripts saved them."""
    buf = io.BytesIO()
    np.savez_compressed(buf, arr_0=research_array(x))
    return atomic_write(path, buf.getvalue())


_ZIP_EPOCH = (1980, 1, 1, 0, 0, 0)
_ALREADY_COMPRESSED = (".gz", ".png", ".npz", ".zip")


def write_zip(path: str | Path, files: Sequence[str | Path], root: str | Path) -> Path:
    """Zip `files` under their paths relative to `root`, with fixed timestamps."""
    root = Path(root)

    def write(tmp: Path) -> None:
        with zipfile.ZipFile(tmp, "w") as zf:
            for f in files:
                f = Path(f)
                arcname = (f if not f.is_absolute() else f.relative_to(root)).as_posix()
                info = zipfile.ZipInfo(arcname, date_time=_ZIP_EPOCH)
                info.external_attr = 0o644 << 16
                stored = arcname.endswith(_ALREADY_COMPRESSED)
                info.compress_type = zipfile.ZIP_STORED if stored else zipfile.ZIP_DEFLATED
                zf.writestr(info, (root / arcname).read_bytes())

    return atomic_write(path, write)


# ---------------------------------------------------------------------------
# Finishing a run: the same steps for a service job and for `synthmri sample`


def write_run_summary(
    directory: Path,
    names: RunNames,
    samples: Sequence[Mapping[str, np.ndarray]],
    indices: Sequence[int],
    channels: Sequence[str],
    raw: np.ndarray | None = None,
    grid_written: bool = False,
) -> list[str]:
    """The research npz (given the raw samples) and the grid (unless `grid_written`: drawn from
    these very samples already); returns their names in `directory`."""
    written = []
    if raw is not None:
        write_npz(directory / names.npz, raw)
        written.append(names.npz)
    if not grid_written:
        write_grid(directory / GRID, samples, channels, row_labels=grid_labels(indices))
    written.append(GRID)
    return written


def grid_labels(indices: Sequence[int]) -> list[str]:
    return [sample_label(i) for i in indices]


def write_manifest_and_archive(
    directory: Path, names: RunNames, files: Sequence[str], manifest: Mapping[str, Any]
) -> None:
    """manifest.json, then the archive of `files` (names in `directory`) and the manifest."""
    write_manifest(directory / MANIFEST, manifest)
    write_zip(directory / names.archive, [*files, MANIFEST], directory)
