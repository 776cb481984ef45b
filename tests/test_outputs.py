"""Output writers: NIfTI pixels/dtype/affine/labels, PNG orientation, grid overlay, npz layout, atomicity."""

from __future__ import annotations

import io
import json
import zipfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from PIL import Image

from synthmri.atomic import atomic_write
from synthmri.outputs import writers


def _sample(size: int = 32, shift: int = 0) -> dict[str, np.ndarray]:
    """A t1ce ramp (so orientation is visible) and a seg with all three tumour labels."""
    a, b = np.meshgrid(np.arange(size), np.arange(size), indexing="ij")
    t1ce = ((a + 2 * b + shift) % size / (size - 1)).astype(np.float32)
    seg = np.zeros((size, size), np.uint8)
    seg[4:10, 4:10] = 2
    seg[6:8, 6:8] = 1
    seg[20:26, 10:14] = 4
    return {"t1ce": t1ce, "seg": seg}


def test_nifti_image_pixels_dtype_affine(tmp_path: Path) -> None:
    s = _sample()
    paths = writers.write_sample(tmp_path, "job", 7, s)
    assert [p.name for p in paths] == [
        "job_0007_t1ce.nii.gz",
        "job_0007_t1ce.png",
        "job_0007_seg.nii.gz",
        "job_0007_seg.png",
    ]
    img = nib.load(tmp_path / "job_0007_t1ce.nii.gz")
    data = np.asanyarray(img.dataobj)
    assert data.dtype == np.float32 and data.shape == (32, 32, 1)
    np.testing.assert_array_equal(data[:, :, 0], s["t1ce"])
    np.testing.assert_array_equal(img.affine, np.diag([-1.0, -1.0, 1.0, 1.0]))
    hdr = img.header
    assert hdr.get_zooms() == (1.0, 1.0, 1.0)
    assert hdr.get_xyzt_units()[0] == "mm"
    assert int(hdr["qform_code"]) == 1 and int(hdr["sform_code"]) == 1
    assert nib.aff2axcodes(img.affine) == ("L", "P", "S")
    assert b"SynthMRI" in hdr["descrip"].tobytes()


def test_nifti_seg_labels(tmp_path: Path) -> None:
    s = _sample()
    writers.write_sample(tmp_path, "job", 0, s)
    seg = nib.load(tmp_path / "job_0000_seg.nii.gz")
    data = np.asanyarray(seg.dataobj)
    assert data.dtype == np.uint8 and data.shape == (32, 32, 1)
    assert set(np.unique(data).tolist()) == {0, 1, 2, 4}
    np.testing.assert_array_equal(data[:, :, 0], s["seg"])


def test_nifti_bytes_are_reproducible() -> None:
    s = _sample()
    assert writers.nifti_bytes(s["t1ce"], "t1ce") == writers.nifti_bytes(s["t1ce"], "t1ce")


def test_png_is_transposed_8bit(tmp_path: Path) -> None:
    s = _sample()
    writers.write_sample(tmp_path, "x", 1, s)
    png = np.asarray(Image.open(tmp_path / "x_0001_t1ce.png"))
    assert png.dtype == np.uint8 and png.shape == (32, 32)
    # Pixel (row y, column x) shows img[x, y]: the display is img.T.
    np.testing.assert_array_equal(png, np.rint(s["t1ce"] * 255).astype(np.uint8).T)
    seg_png = np.asarray(Image.open(tmp_path / "x_0001_seg.png").convert("RGB"))
    assert tuple(seg_png[5, 5]) == writers.LABEL_COLOURS[2]  # seg[5,5]=2, symmetric position
    assert tuple(seg_png[12, 22]) == writers.LABEL_COLOURS[4]  # seg[22,12]=4 → row 12, col 22
    assert tuple(seg_png[22, 12]) == (0, 0, 0)
    assert tuple(seg_png[6, 6]) == writers.LABEL_COLOURS[1]


def test_grid_layout_and_overlay(tmp_path: Path) -> None:
    samples = [_sample(shift=0), _sample(shift=5), _sample(shift=11)]
    path = tmp_path / "grid.png"
    layout = writers.write_grid(path, samples, ("t1ce", "seg"), row_labels=["0000", "0001", "0002"])
    grid = np.asarray(Image.open(path).convert("RGB")).astype(int)
    assert grid.shape == (layout.height, layout.width, 3)
    assert layout.rows == 3 and layout.cols == 2 and layout.scale == 4 and layout.cell == 128

    for row, s in enumerate(samples):
        x0, y0, x1, y1 = layout.cell_box(row, 0)
        img_cell = grid[y0:y1, x0:x1]
        expected = np.kron(writers.to_display(s["t1ce"]), np.ones((4, 4), np.uint8))
        np.testing.assert_array_equal(img_cell[:, :, 0], expected)

        x0, y0, x1, y1 = layout.cell_box(row, 1)
        seg_cell = grid[y0:y1, x0:x1]
        seg_up = np.kron(s["seg"].T, np.ones((4, 4), np.uint8))
        coloured = (seg_cell.max(axis=2) - seg_cell.min(axis=2)) > 20
        # Colour exactly where seg > 0; grey (the T1CE underneath) everywhere else.
        np.testing.assert_array_equal(coloured, seg_up > 0)
        np.testing.assert_array_equal(seg_cell[seg_up == 0][:, 0], expected[seg_up == 0])
        for label, colour in writers.LABEL_COLOURS.items():
            px = seg_cell[seg_up == label]
            # Each label's hue dominates: its brightest RGB component is the colour's.
            assert (px.argmax(axis=1) == int(np.argmax(colour))).all(), label


def test_grid_has_header_and_legend_text(tmp_path: Path) -> None:
    layout = writers.write_grid(tmp_path / "g.png", [_sample()], ("t1ce", "seg"))
    grid = np.asarray(Image.open(tmp_path / "g.png").convert("RGB")).astype(int)
    header = grid[: layout.top]
    legend = grid[layout.top + layout.cell + layout.pad :]
    assert (header > 200).all(axis=2).sum() > 20  # white column titles were drawn
    for colour in writers.LABEL_COLOURS.values():
        assert (legend == np.array(colour)).all(axis=2).sum() >= 100  # a legend swatch per label


def test_grid_five_channels_without_t1ce_uses_first_image() -> None:
    s = {
        c: np.full((16, 16), v, np.float32)
        for c, v in zip(("t1", "t2", "flair"), (0.2, 0.5, 0.8), strict=True)
    }
    s["seg"] = np.zeros((16, 16), np.uint8)
    image, layout = writers.render_grid([s], ("t1", "t2", "flair", "seg"))
    x0, y0, x1, y1 = layout.cell_box(0, 3)
    seg_cell = np.asarray(image)[y0:y1, x0:x1]
    assert (seg_cell == round(0.2 * 255)).all()  # no labels: the overlay shows plain t1


def test_research_npz_layout(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    x = rng.uniform(-1, 1, size=(3, 2, 8, 8)).astype(np.float32)
    x[0, 0, 0, 0], x[0, 0, 0, 1], x[0, 0, 0, 2] = -1.0, 1.0, 0.0
    writers.write_npz(tmp_path / "s.npz", x)
    arr = np.load(tmp_path / "s.npz")["arr_0"]
    assert arr.dtype == np.uint8 and arr.shape == (3, 8, 8, 2)
    assert arr[0, 0, 0, 0] == 0 and arr[0, 0, 1, 0] == 255 and arr[0, 0, 2, 0] == 128
    np.testing.assert_array_equal(arr[2, :, :, 1], np.rint((x[2, 1] + 1) * 127.5).astype(np.uint8))


def test_manifest_and_zip(tmp_path: Path) -> None:
    files = writers.write_sample(tmp_path, "job", 0, _sample())
    manifest = writers.make_manifest(
        seed=3,
        sampler="ddim",
        steps=10,
        sha256="ab" * 32,
        model="tiny",
        channel_set="t1ce+seg",
        channels=("t1ce", "seg"),
        image_size=32,
        indices=[0],
        files=[f.name for f in files],
        timings={"sample_s": 1.234567},
        version="0.1.0",
    )
    files.append(writers.write_manifest(tmp_path / "manifest.json", manifest))
    loaded = json.loads((tmp_path / "manifest.json").read_text())
    assert loaded["seed"] == 3 and loaded["sha256"] == "ab" * 32 and loaded["count"] == 1
    assert loaded["timings"] == {"sample_s": 1.2346}
    writers.write_zip(tmp_path / "job.zip", files, root=tmp_path)
    with zipfile.ZipFile(tmp_path / "job.zip") as zf:
        assert sorted(zf.namelist()) == sorted(f.name for f in files)
        assert zf.read("manifest.json") == (tmp_path / "manifest.json").read_bytes()
        nii = nib.Nifti1Image.from_bytes(__import__("gzip").decompress(zf.read("job_0000_seg.nii.gz")))
        assert set(np.unique(np.asanyarray(nii.dataobj)).tolist()) == {0, 1, 2, 4}
        assert Image.open(io.BytesIO(zf.read("job_0000_t1ce.png"))).size == (32, 32)
    first = (tmp_path / "job.zip").read_bytes()
    writers.write_zip(tmp_path / "job.zip", files, root=tmp_path)
    assert (tmp_path / "job.zip").read_bytes() == first  # fixed timestamps: reproducible


def test_atomic_write_leaves_old_file_on_failure(tmp_path: Path) -> None:
    target = tmp_path / "a.png"
    target.write_bytes(b"old")

    def crash(tmp: Path) -> None:
        tmp.write_bytes(b"half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        atomic_write(target, crash)
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["a.png"]  # no temp file left behind


def test_nifti_rejects_non_2d() -> None:
    with pytest.raises(ValueError, match="expected a 2-D slice"):
        writers.nifti_bytes(np.zeros((2, 4, 4), np.float32), "t1ce")


def test_writers_name_files_as_the_layout_says(tmp_path: Path) -> None:
    """The API serves the names `layout` gives; the writers must write exactly those."""
    from synthmri.outputs.layout import sample_files

    for formats in (["nifti"], ["png"], ["nifti", "png"]):
        out = tmp_path / "+".join(formats)
        out.mkdir()
        written = writers.write_sample(out, "job", 3, _sample(), formats)
        assert [p.name for p in written] == sample_files("job", 3, ["t1ce", "seg"], formats)
        assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in written)


def test_expiry_marker_round_trip(tmp_path: Path) -> None:
    from synthmri.outputs.layout import read_expiry, write_expiry

    assert read_expiry(tmp_path) is None  # not finalised: no marker
    write_expiry(tmp_path, 1234.5)
    assert read_expiry(tmp_path) == 1234.5


def test_files_written_without_fsync_are_whole_and_flushed_together(tmp_path: Path) -> None:
    from synthmri.atomic import atomic_write, flush_to_disk

    paths = [atomic_write(tmp_path / f"f{i}.bin", bytes([i]) * 1000, durable=False) for i in range(5)]
    flush_to_disk(tmp_path)
    assert [p.read_bytes() for p in paths] == [bytes([i]) * 1000 for i in range(5)]
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"f{i}.bin" for i in range(5)]  # no temp files
    with pytest.raises(FileNotFoundError):
        flush_to_disk(tmp_path / "missing")


@pytest.mark.parametrize("channel", ["t1ce", "seg"])
def test_nifti_bytes_are_what_nibabel_writes_for_the_slice(channel: str) -> None:
    """The shared header plus the voxels equal nibabel's own image of that slice, byte for byte."""
    import gzip

    rng = np.random.default_rng(3)
    img = rng.choice([0, 1, 2, 4], (64, 64)) if channel == "seg" else rng.uniform(0, 1, (64, 64))
    data = (img.astype(np.uint8) if channel == "seg" else img.astype(np.float32))[:, :, None]
    nii = nib.Nifti1Image(data, writers.AFFINE)
    nii.header.set_data_dtype(data.dtype)
    nii.set_qform(writers.AFFINE, code=writers.NIFTI_XFORM_SCANNER_ANAT)
    nii.set_sform(writers.AFFINE, code=writers.NIFTI_XFORM_SCANNER_ANAT)
    nii.header.set_xyzt_units(xyz="mm")
    descrip = ("SynthMRI synthetic seg: BraTS labels 0,1 NCR,2 ED,4 ET" if channel == "seg"
               else f"SynthMRI synthetic {channel}, intensity in [0,1]")  # fmt: skip
    nii.header["descrip"] = descrip.encode()[:79]
    nii.header["cal_min"], nii.header["cal_max"] = (0.0, 4.0) if channel == "seg" else (0.0, 1.0)
    assert gzip.decompress(writers.nifti_bytes(img, channel)) == nii.to_bytes()


@pytest.mark.parametrize("shape", [(1, 1), (7, 13), (64, 64), (5, 9, 3), (3, 4, 4), (1, 6, 3)])
def test_png_bytes_decode_to_the_array_they_encode(shape: tuple[int, ...]) -> None:
    """Pillow (and so every viewer) reads back exactly the pixels: grey, RGB and RGBA, any size,
    with differences to the row above that wrap around 0 and 255."""
    rng = np.random.default_rng(len(shape) * 100 + shape[0])
    a = rng.integers(0, 256, shape, dtype=np.uint8)
    a[0] = 255  # the next row's difference wraps below zero
    decoded = Image.open(io.BytesIO(writers.png_bytes(a)))
    assert decoded.mode == {1: "L", 3: "RGB", 4: "RGBA"}[1 if a.ndim == 2 else a.shape[2]]
    np.testing.assert_array_equal(np.asarray(decoded), a)


def test_png_bytes_refuse_what_png_cannot_hold() -> None:
    with pytest.raises(ValueError, match="expected an 8-bit"):
        writers.png_bytes(np.zeros((4, 4), np.float32))
    with pytest.raises(ValueError, match="expected an 8-bit"):
        writers.png_bytes(np.zeros((4, 4, 2), np.uint8))


def test_grid_png_holds_the_rendered_grid() -> None:
    samples = [_sample(shift=k) for k in range(3)]
    data, layout = writers.grid_png(samples, ["t1ce", "seg"], ["a", "b", "c"])
    image, _ = writers.render_grid(samples, ["t1ce", "seg"], ["a", "b", "c"])
    decoded = Image.open(io.BytesIO(data))
    assert decoded.size == (layout.width, layout.height)
    np.testing.assert_array_equal(np.asarray(decoded), np.asarray(image))
