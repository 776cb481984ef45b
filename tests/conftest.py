"""Shared fixtures. `tiny_checkpoint` is a stable random-init `tiny` preset checkpoint.

The `tiny` UNet zero-initialises its output convolutions (so an untrained net predicts
ε = 0); the fixture fills every all-zero weight with small seeded noise instead, so the
network output depends on its input and sampling tests are not vacuous.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

# The skip policy fails a run on any skip it does not expect; pytester lets its test run pytest.
pytest_plugins = ["tests.skip_policy", "pytester"]

TINY_SEED = 1234


def build_tiny_checkpoint(directory: Path, channel_set: str | None = None, seed: int = TINY_SEED) -> str:
    """Write a random-init `tiny` checkpoint (deterministic in `seed`) and return its sha256."""
    import torch

    from model.checkpoint import save_checkpoint
    from model.config import CheckpointConfig, get_preset
    from model.unet import UNetModel

    preset = get_preset("tiny", channel_set)
    torch.manual_seed(seed)
    model = UNetModel(preset.model)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim > 1 and not p.any():
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    config = CheckpointConfig(
        name=f"tiny-{preset.channel_set}",
        channel_set=preset.channel_set,
        model=preset.model,
        diffusion=preset.diffusion,
        provenance={"steps": 0, "data_fingerprint": "random-init", "code_version": "test"},
    )
    return save_checkpoint(directory, model.state_dict(), config)


@pytest.fixture(scope="session")
def _tiny_checkpoint_master(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("ckpt") / "tiny"
    build_tiny_checkpoint(directory)
    return directory


@pytest.fixture
def tiny_checkpoint(_tiny_checkpoint_master: Path, tmp_path: Path) -> Iterator[Path]:
    """A private copy (free to modify) of the random-init `tiny` (t1ce+seg, 32²) checkpoint dir."""
    directory = tmp_path / "tiny-ckpt"
    shutil.copytree(_tiny_checkpoint_master, directory)
    yield directory


@pytest.fixture(scope="session")
def tiny_checkpoint_readonly(_tiny_checkpoint_master: Path) -> Path:
    """The shared session copy of the tiny checkpoint, for tests that only read it."""
    return _tiny_checkpoint_master


@pytest.fixture
def torch_single_thread() -> Iterator[None]:
    """Run a test on one intra-op thread (restored afterwards).

    On the shared 2-core CI box, small-model tests run ~10× faster single-threaded than
    with two threads fighting other processes for the cores.
    """
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)
