"""`synthmri sample` end to end on the tiny checkpoint: outputs opened and checked, bad args → exit 2."""

from __future__ import annotations

import json
import subprocess
import sys
import zipfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from PIL import Image

from synthmri.cli import main
from synthmri.hashing import checkpoint_sha256
from tests.skip_policy import HAS_CUDA

pytestmark = pytest.mark.usefixtures("torch_single_thread")


def test_sample_writes_every_output(
    tiny_checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "out"
    argv = ["sample", "--model", str(tiny_checkpoint), "--count", "3", "--seed", "42", "--sampler", "ddim"]
    argv += ["--steps", "4", "--batch-size", "2", "--npz", "--out", str(out)]
    assert main(argv) == 0
    captured = capsys.readouterr()
    assert "wrote 3 sample(s) × 2 channel(s)" in captured.out
    assert "12/12" in captured.err  # tqdm: 3 samples × 4 steps

    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["seed"] == 42 and manifest["sampler"] == "ddim" and manifest["steps"] == 4
    assert manifest["sha256"] == checkpoint_sha256(tiny_checkpoint)
    assert manifest["model"] == "tiny-t1ce+seg" and manifest["channel_set"] == "t1ce+seg"
    assert manifest["count"] == 3 and manifest["version"] == "0.1.0"
    assert manifest["timings"]["sample_s"] > 0
    expected = {
        f"sample_{i:04d}_{c}.{e}" for i in range(3) for c in ("t1ce", "seg") for e in ("nii.gz", "png")
    }
    expected |= {"grid.png", "sample.npz", "sample.zip"}
    assert set(manifest["files"]) == expected
    for name in expected:
        assert (out / name).is_file(), name
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]

    # The NIfTI files hold exactly the samples in the research npz (same run, same arrays).
    arr = np.load(out / "sample.npz")["arr_0"]
    assert arr.shape == (3, 32, 32, 2) and arr.dtype == np.uint8
    for i in range(3):
        t1ce = nib.load(out / f"sample_{i:04d}_t1ce.nii.gz")
        img = np.asanyarray(t1ce.dataobj)[:, :, 0]
        assert img.dtype == np.float32 and img.min() >= 0.0 and img.max() <= 1.0
        assert np.abs(np.rint(img * 255) - arr[i, :, :, 0]).max() <= 1
        seg = np.asanyarray(nib.load(out / f"sample_{i:04d}_seg.nii.gz").dataobj)[:, :, 0]
        assert seg.dtype == np.uint8 and set(np.unique(seg).tolist()) <= {0, 1, 2, 4}
        np.testing.assert_array_equal(t1ce.affine, np.diag([-1.0, -1.0, 1.0, 1.0]))
    assert Image.open(out / "grid.png").size[1] > 3 * 128  # three 128-px rows plus header
    with zipfile.ZipFile(out / "sample.zip") as zf:
        assert set(zf.namelist()) == (expected - {"sample.zip"}) | {"manifest.json"}


def test_same_seed_same_files_across_batch_sizes(tiny_checkpoint_readonly: Path, tmp_path: Path) -> None:
    base = [
        "sample",
        "--model",
        str(tiny_checkpoint_readonly),
        "--seed",
        "7",
        "--sampler",
        "ddim",
        "--steps",
        "3",
    ]
    assert (
        main([*base, "--count", "2", "--batch-size", "2", "--name", "a", "--out", str(tmp_path / "a")]) == 0
    )
    assert (
        main([*base, "--count", "2", "--batch-size", "2", "--name", "a", "--out", str(tmp_path / "b")]) == 0
    )
    # Same request: byte-identical NIfTI (gzip without timestamps).
    for name in ("a_0001_t1ce.nii.gz", "a_0001_seg.nii.gz"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--count", "0"], "--count must be ≥ 1, got 0"),
        (["--count", "2", "--sampler", "euler"], "argument --sampler: invalid choice: 'euler'"),
        (["--count", "2", "--steps", "0"], "--steps must be ≥ 1, got 0"),
        (["--count", "2", "--batch-size", "0"], "--batch-size must be ≥ 1, got 0"),
        (["--count", "2", "--seed", "-1"], "--seed must be in 0.."),
        (["--count", "2", "--name", "../x"], "--name '../x' must be letters"),
    ],
)
def test_bad_arguments_exit_2(
    tiny_checkpoint_readonly: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture,
    extra: list[str],
    message: str,
) -> None:
    argv = [
        "sample",
        "--model",
        str(tiny_checkpoint_readonly),
        "--seed",
        "1",
        "--out",
        str(tmp_path / "o"),
        *extra,
    ]
    assert _run(argv) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
    assert not (tmp_path / "o").exists()


def _run(argv: list[str]) -> int:
    """Exit code of `synthmri ...`, whether argparse exits or the command returns."""
    try:
        return main(argv)
    except SystemExit as e:
        return int(e.code or 0)


def test_missing_model_dir(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    code = main(
        ["sample", "--model", str(tmp_path / "nope"), "--count", "1", "--seed", "1", "--out", str(tmp_path)]
    )
    assert code == 2
    assert (
        capsys.readouterr().err
        == f"synthmri sample: error: --model {tmp_path / 'nope'} is not a checkpoint directory\n"
    )


def test_corrupt_checkpoint(tiny_checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    weights = tiny_checkpoint / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    code = main(
        [
            "sample",
            "--model",
            str(tiny_checkpoint),
            "--count",
            "1",
            "--seed",
            "1",
            "--out",
            str(tmp_path / "o"),
        ]
    )
    assert code == 2
    err = capsys.readouterr().err
    assert (
        err.startswith("synthmri sample: error: ")
        and "is truncated or corrupt" in err
        and err.count("\n") == 1
    )


def test_cuda_unavailable(
    tiny_checkpoint_readonly: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip(HAS_CUDA)
    argv = ["sample", "--model", str(tiny_checkpoint_readonly), "--count", "1", "--seed", "1"]
    assert main([*argv, "--device", "cuda", "--out", str(tmp_path / "o")]) == 2
    assert "no CUDA device is available" in capsys.readouterr().err


def test_console_entry_point(tiny_checkpoint_readonly: Path, tmp_path: Path) -> None:
    """The real process: exit code, stderr progress bar, files on disk."""
    # Through synthmri.cli.main as the console script calls it (`python -m synthmri.cli` would
    # run the dispatcher as __main__, whose CliError is a different class from the one raised).
    launcher = "import sys; from synthmri.cli import main; sys.exit(main())"
    cmd = [sys.executable, "-c", launcher, "sample", "--model", str(tiny_checkpoint_readonly)]
    cmd += ["--count", "1", "--seed", "3", "--sampler", "dpm++", "--steps", "2", "--out", str(tmp_path / "o")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "sampling" in proc.stderr and "2/2" in proc.stderr
    assert (tmp_path / "o" / "sample_0000_seg.nii.gz").is_file()
    bad = subprocess.run([*cmd[:-1], str(tmp_path / "p"), "--count", "-3"], capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stderr.strip() == "synthmri sample: error: --count must be ≥ 1, got -3"


def test_precision_is_recorded_and_int8_runs_or_says_why(
    tiny_checkpoint_readonly: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from model import quantize
    from model.inference import cpu_has_native_bf16

    argv = ["sample", "--model", str(tiny_checkpoint_readonly), "--count", "2", "--seed", "3",
            "--sampler", "ddim", "--steps", "4"]  # fmt: skip
    assert main([*argv, "--out", str(tmp_path / "auto")]) == 0
    auto = json.loads((tmp_path / "auto" / "manifest.json").read_text())
    assert auto["precision"] == ("bf16" if cpu_has_native_bf16() else "fp32")  # resolved, not "auto"
    if quantize.int8_supported():
        assert main([*argv, "--precision", "int8", "--out", str(tmp_path / "int8")]) == 0
        assert json.loads((tmp_path / "int8" / "manifest.json").read_text())["precision"] == "int8"
        for i in range(2):
            a, b = (np.asanyarray(nib.load(tmp_path / d / f"sample_{i:04d}_t1ce.nii.gz").dataobj)
                    for d in ("auto", "int8"))  # fmt: skip
            # Same seed, same sampler: int8 rounding moves pixels a little, not the whole image.
            assert 0 < np.abs(a - b).mean() < 0.05
    capsys.readouterr()
    monkeypatch.setattr(quantize, "cpu_has_vnni", lambda: False)
    assert main([*argv, "--precision", "int8", "--out", str(tmp_path / "no")]) == 2
    err = capsys.readouterr().err
    assert "--precision int8: int8 needs a CPU with VNNI" in err and err.count("\n") == 1
    assert not (tmp_path / "no").exists()
