"""Exact resume: N steps straight equals N/2 steps, a restart from train_state.pt, and N/2 more."""

from __future__ import annotations

from pathlib import Path

import torch

from model.checkpoint import load_checkpoint
from training.config import preset_config
from training.train import main, train


def synthetic_slices(n: int = 12, seed: int = 1) -> list[torch.Tensor]:
    """Smooth random (2, 32, 32) images in [-1, 1], held in memory."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(n, 2, 4, 4, generator=g) * 2 - 1
    return list(torch.nn.functional.interpolate(coarse, size=32, mode="bilinear", align_corners=False))


def test_resume_is_bit_identical_to_a_straight_run(tmp_path: Path) -> None:
    # 12 slices, batch 8: the 4 steps cross two epoch boundaries, so the restored data
    # position (epoch + offset) matters; cosine LR and a warm-up make the LR step-dependent.
    common = dict(steps=4, global_batch=8, micro_batch=4, lr_schedule="cosine", warmup=1, ckpt_every=2,
                  sample_count=0, progress=False, val_batches=1, ema_decay=0.8, precision="fp32")
    data = (synthetic_slices(), synthetic_slices(4, seed=2), "synthetic")
    straight = tmp_path / "straight"
    train(preset_config("tiny", out=str(straight), **common), data)  # type: ignore[arg-type]

    half = tmp_path / "half"
    train(preset_config("tiny", out=str(half), **{**common, "stop_at": 2}), data)  # type: ignore[arg-type]
    state = torch.load(half / "train_state.pt", weights_only=False)
    assert state["step"] == 2 and state["data_position"] == {"epoch": 1, "offset": 4, "position": 16,
                                                             "dataset_len": 12}
    train(preset_config("tiny", out=str(half), resume=str(half), **common), data)  # type: ignore[arg-type]

    a = torch.load(straight / "train_state.pt", weights_only=False)
    b = torch.load(half / "train_state.pt", weights_only=False)
    assert a["step"] == b["step"] == 4
    for key in ("model",):
        for name, w in a[key].items():
            assert torch.equal(w, b[key][name]), f"model weight {name} differs after resume"
    for name, w in a["ema"]["model"].items():
        assert torch.equal(w, b["ema"]["model"][name]), f"EMA weight {name} differs after resume"
    assert a["optimizer"]["state"][0]["exp_avg_sq"].equal(b["optimizer"]["state"][0]["exp_avg_sq"])
    # And the half run really did train in two pieces: its first state differs from the final one.
    assert not all(torch.equal(w, a["model"][k]) for k, w in state["model"].items())
    # The registry checkpoint holds the EMA weights and loads.
    ckpt = load_checkpoint(half)
    for name, w in ckpt.model.state_dict().items():
        assert torch.equal(w, b["ema"]["model"][name])
    assert ckpt.config.provenance["steps"] == 4


def test_resume_from_a_directory_without_state_is_a_one_line_error(tmp_path: Path, capsys) -> None:
    from synthmri.cli import CliError

    try:
        main(["--resume", str(tmp_path), "--data", str(tmp_path)])
    except CliError as e:
        assert "train_config.json does not exist" in str(e)
    else:
        raise AssertionError("resume from an empty directory must fail")


def test_a_copied_run_resumes_into_the_copy(tmp_path: Path) -> None:
    """The saved train_config.json names the directory the run was first written to; resuming a
    copy must not write back there (it overwrote a shipped model once) unless --out says so."""
    import argparse
    import json

    from synthmri.cli import make_parser
    from training.config import add_config_arguments
    from training.train import TRAIN_CONFIG, resumed_config

    original, copy = tmp_path / "original", tmp_path / "copy"
    copy.mkdir()
    saved = preset_config("tiny", out=str(original), data="data", steps=10)
    (copy / TRAIN_CONFIG).write_text(json.dumps(saved.to_dict()))
    parser: argparse.ArgumentParser = make_parser("train", "test")
    add_config_arguments(parser)
    cfg = resumed_config(parser.parse_args(["--resume", str(copy), "--steps", "20"]), str(copy))
    assert cfg.out == str(copy) and cfg.resume == str(copy) and cfg.steps == 20 and cfg.data == "data"
    elsewhere = tmp_path / "elsewhere"
    cfg = resumed_config(parser.parse_args(["--resume", str(copy), "--out", str(elsewhere)]), str(copy))
    assert cfg.out == str(elsewhere)
