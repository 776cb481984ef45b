"""Training loop pieces: micro-batch gradient averaging, LR schedule, EMA, CLI, end to end."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from model.config import ConfigError, get_preset
from model.diffusion import GaussianDiffusion
from model.inference import cpu_has_native_bf16
from model.unet import UNetModel
from training.config import TrainConfig, preset_config
from training.ema import EMA
from training.phantoms import write_phantoms
from training.schedule import get_lr
from training.train import (
    accumulate_gradients,
    autocast_precision,
    draw_t_noise,
    main,
    resolve_channels_last,
)


def tiny_model(seed: int = 0) -> UNetModel:
    """The tiny UNet with its zero-initialised output layers filled, so every weight gets a gradient."""
    torch.manual_seed(seed)
    model = UNetModel(get_preset("tiny").model)
    with torch.no_grad():
        for p in model.parameters():
            if not p.any():
                p.normal_(0, 0.05)
    return model


def gradients(model: UNetModel, micro_batch: int) -> dict[str, torch.Tensor]:
    diffusion = GaussianDiffusion.from_config(get_preset("tiny").diffusion)
    g = torch.Generator().manual_seed(7)
    x_start = torch.rand(8, 2, 32, 32, generator=g) * 2 - 1
    t, noise = draw_t_noise(range(8), (2, 32, 32), diffusion.num_timesteps, seed=0)
    model.zero_grad(set_to_none=True)
    accumulate_gradients(model, diffusion, x_start, t, noise, micro_batch)
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_micro_batches_average_gradients_like_one_batch() -> None:
    model = tiny_model()
    whole = gradients(model, micro_batch=8)
    assert len(whole) == len(list(model.parameters()))
    for micro in (2, 3):  # 3 → micro-batches of 3, 3, 2: ragged ones are weighted by size
        split = gradients(model, micro_batch=micro)
        for name, g in whole.items():
            torch.testing.assert_close(split[name], g, rtol=1e-5, atol=1e-7, msg=f"{name}, micro {micro}")
    # Summing the four micro-batch means (the reference code's bug) would give 4× these gradients.
    norm = torch.cat([g.flatten() for g in whole.values()]).norm()
    split_norm = torch.cat([g.flatten() for g in gradients(model, 2).values()]).norm()
    assert abs(split_norm / norm - 1) < 1e-5


def test_timesteps_and_noise_depend_only_on_the_stream_position() -> None:
    t_all, n_all = draw_t_noise(range(10, 14), (2, 4, 4), 1000, seed=3)
    t_b, n_b = draw_t_noise([12, 13], (2, 4, 4), 1000, seed=3)
    assert torch.equal(t_all[2:], t_b) and torch.equal(n_all[2:], n_b)
    t_other, _ = draw_t_noise(range(10, 14), (2, 4, 4), 1000, seed=4)
    assert not torch.equal(t_all, t_other)
    t_many, _ = draw_t_noise(range(4000), (1, 1, 1), 1000, seed=0)
    assert t_many.min() == 0 and t_many.max() == 999 and abs(t_many.float().mean().item() - 499.5) < 20


def test_lr_warms_up_linearly_then_follows_the_schedule() -> None:
    cfg = TrainConfig(lr=1e-3, warmup=10, steps=110, lr_schedule="cosine", min_lr=1e-4)
    assert get_lr(0, cfg) == pytest.approx(1e-4)
    assert get_lr(4, cfg) == pytest.approx(5e-4)
    assert get_lr(10, cfg) == pytest.approx(1e-3)
    assert get_lr(60, cfg) == pytest.approx(1e-4 + 0.5 * 9e-4)  # halfway down the cosine
    assert get_lr(110, cfg) == pytest.approx(1e-4)
    assert get_lr(500, cfg) == pytest.approx(1e-4)
    const = TrainConfig(lr=2e-4, warmup=0, lr_schedule="constant")
    assert {get_lr(s, const) for s in (0, 5, 10_000)} == {2e-4}


def test_ema_follows_the_weights_with_the_configured_decay() -> None:
    model = torch.nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        model.weight.fill_(1.0)
    ema = EMA(model, decay=0.9, warmup=False)
    with torch.no_grad():
        model.weight.fill_(3.0)
    ema.update(model)  # 0.9·1 + 0.1·3
    torch.testing.assert_close(ema.model.weight, torch.full((1, 2), 1.2))
    warm = EMA(model, decay=0.999, warmup=True)
    assert warm.current_decay() == pytest.approx(0.1)  # (1+0)/(10+0): early updates mostly copy
    warm.num_updates = 10_000
    assert warm.current_decay() == 0.999
    restored = EMA(model, decay=0.9)
    restored.load_state_dict(ema.state_dict())
    assert restored.num_updates == 1
    assert torch.equal(restored.model.state_dict()["weight"], ema.model.state_dict()["weight"])


def test_presets_and_validation() -> None:
    research = preset_config("research-2ch")
    assert research.global_batch == 128 and research.micro_batch == 8 and research.channel_set == "t1ce+seg"
    assert preset_config("demo").image_size == 64 and preset_config("tiny").image_size == 32
    assert preset_config("tiny", channels="t1ce").model_preset.model.in_channels == 1
    with pytest.raises(ConfigError, match="not divisible by the world size 3"):
        preset_config("tiny", global_batch=8).validate(world_size=3)
    with pytest.raises(ConfigError, match="unknown preset"):
        preset_config("huge")


def test_auto_precision_and_memory_format() -> None:
    cpu = torch.device("cpu")
    assert autocast_precision(cpu, "auto") == ("bf16" if cpu_has_native_bf16() else "fp32")
    assert autocast_precision(cpu, "fp32") == "fp32" and autocast_precision(cpu, "bf16") == "bf16"
    with pytest.raises(ConfigError, match="fp16 needs CUDA"):
        autocast_precision(cpu, "fp16")
    assert resolve_channels_last("auto", "bf16") and not resolve_channels_last("auto", "fp32")
    assert resolve_channels_last("on", "fp32") and not resolve_channels_last("off", "bf16")
    # configs saved before "auto" hold booleans
    assert resolve_channels_last(True, "fp32") and not resolve_channels_last(False, "bf16")


def test_cli_errors_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from synthmri.cli import main as synthmri_main

    assert synthmri_main(["train", "--preset", "tiny", "--out", str(tmp_path)]) == 2
    assert "--data DIR is required" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["--precision", "fp8"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "invalid choice: 'fp8'" in err
    code = synthmri_main(["train", "--preset", "tiny", "--data", str(tmp_path), "--out", str(tmp_path),
                          "--global-batch", "0"])
    assert code == 2 and "global_batch and micro_batch must be ≥ 1" in capsys.readouterr().err


@pytest.fixture(scope="module")
def phantom_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("phantoms")
    write_phantoms(out, 3, 0)
    return out


def test_cli_trains_on_phantoms_and_writes_a_loadable_checkpoint(phantom_dir: Path, tmp_path: Path) -> None:
    """End to end through the real loader: checkpoint, metrics, loss curve, sample grid."""
    from PIL import Image

    from model.checkpoint import load_checkpoint

    out = tmp_path / "run"
    rc = main(["--preset", "tiny", "--data", str(phantom_dir), "--out", str(out), "--steps", "6",
               "--global-batch", "4", "--micro-batch", "2", "--ckpt-every", "3", "--log-every", "1",
               "--sample-count", "2", "--sample-steps", "3", "--progress", "false",
               "--cache-dir", str(tmp_path / "cache"), "--val-fraction", "0.34"])
    assert rc == 0
    ckpt = load_checkpoint(out)
    prov = ckpt.config.provenance
    assert prov["steps"] == 6 and prov["images_seen"] == 24 and len(prov["data_fingerprint"]) >= 8
    assert prov["recipe"]["micro_batch"] == 2 and prov["code_version"].startswith("0.")
    # The checkpoint names its data folder, never this machine's paths (data, out, cache).
    config_text = (out / "config.json").read_text()
    assert prov["recipe"]["data"] == phantom_dir.name
    assert str(phantom_dir) not in config_text and str(tmp_path) not in config_text
    auto_bf16 = cpu_has_native_bf16()  # "auto": bf16 channels_last where the CPU has bf16 dot products
    assert prov["precision"] == ("bf16" if auto_bf16 else "fp32") and prov["channels_last"] is auto_bf16
    state = torch.load(out / "train_state.pt", weights_only=False)
    for name, w in ckpt.model.state_dict().items():
        assert torch.equal(w, state["ema"]["model"][name]), f"checkpoint {name} is not the EMA weight"
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train_records = [r for r in records if r["kind"] == "train"]
    assert [r["step"] for r in train_records] == [1, 2, 3, 4, 5, 6]
    assert all(math.isfinite(r["loss"]) and r["loss"] > 0 and r["images_per_s"] > 0 for r in train_records)
    assert all(r["loss"] == pytest.approx(r["mse"] + 1e-3 * 1000 * r["vb"], rel=1e-4) for r in train_records)
    assert [r["step"] for r in records if r["kind"] == "val"] == [3, 6]
    curve = np.asarray(Image.open(out / "loss_curve.png").convert("L"))
    assert curve.std() > 10  # a drawn plot, not a blank canvas
    grid = np.asarray(Image.open(out / "samples" / "step0000006.png").convert("L"))
    assert grid.shape[0] > 2 * 32 and grid.std() > 5
