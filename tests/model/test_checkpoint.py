"""Checkpoint format: round-trip, torch-free config reading, and one clear error per broken case."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

from model.checkpoint import CONFIG_FILE, WEIGHTS_FILE, CheckpointError, load_checkpoint, read_config
from synthmri.hashing import checkpoint_sha256
from tests.conftest import build_tiny_checkpoint


def _load_error(directory: Path) -> str:
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(directory)
    message = str(info.value)
    assert "\n" not in message, "errors must be one line"
    return message


def test_round_trip_weights_config_and_sha(tiny_checkpoint: Path, tmp_path: Path) -> None:
    from model.checkpoint import save_checkpoint

    ckpt = load_checkpoint(tiny_checkpoint)
    assert not ckpt.model.training
    assert all(not p.requires_grad for p in ckpt.model.parameters())
    assert ckpt.sha256 == checkpoint_sha256(tiny_checkpoint)
    assert ckpt.config == read_config(tiny_checkpoint)
    assert ckpt.config.provenance["data_fingerprint"] == "random-init"

    on_disk = load_file(str(tiny_checkpoint / WEIGHTS_FILE))
    loaded = ckpt.model.state_dict()
    assert on_disk.keys() == loaded.keys()
    for k, v in on_disk.items():
        assert torch.equal(v, loaded[k]), k

    # Saving what was loaded reproduces the same bytes, hence the same sha256.
    again = tmp_path / "again"
    sha = save_checkpoint(again, loaded, ckpt.config)
    assert sha == ckpt.sha256
    assert (again / CONFIG_FILE).read_bytes() == (tiny_checkpoint / CONFIG_FILE).read_bytes()
    assert not [p.name for p in again.iterdir() if p.name.endswith(".tmp")]


def test_builder_is_deterministic(tmp_path: Path, tiny_checkpoint: Path) -> None:
    assert build_tiny_checkpoint(tmp_path / "b") == checkpoint_sha256(tiny_checkpoint)
    assert build_tiny_checkpoint(tmp_path / "c", seed=99) != checkpoint_sha256(tiny_checkpoint)


def test_weights_differ_from_a_zero_output_net(tiny_checkpoint: Path) -> None:
    # The shared fixture must have a live output layer, else sampling tests are vacuous.
    ckpt = load_checkpoint(tiny_checkpoint)
    x = torch.randn(2, 2, 32, 32)
    out = ckpt.model(x, torch.tensor([10, 500]))
    assert out.shape == (2, 4, 32, 32)
    assert out.abs().mean() > 1e-3


def test_read_config_needs_no_torch(tiny_checkpoint: Path) -> None:
    code = (
        "import sys; sys.modules['torch'] = None\n"
        "from model.checkpoint import read_config\n"
        f"c = read_config({str(tiny_checkpoint)!r}); print(c.channel_set, c.image_size)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["t1ce+seg", "32"]


def test_missing_directory(tmp_path: Path) -> None:
    assert _load_error(tmp_path / "nope") == f"checkpoint directory {tmp_path / 'nope'} does not exist"


@pytest.mark.parametrize("name", [WEIGHTS_FILE, CONFIG_FILE])
def test_missing_file(tiny_checkpoint: Path, name: str) -> None:
    (tiny_checkpoint / name).unlink()
    assert _load_error(tiny_checkpoint) == f"checkpoint {tiny_checkpoint} has no {name}"


def test_truncated_weights(tiny_checkpoint: Path) -> None:
    path = tiny_checkpoint / WEIGHTS_FILE
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    msg = _load_error(tiny_checkpoint)
    assert msg.startswith(f"{path} is truncated or corrupt (")
    assert "not fully covered" in msg


def test_garbage_weights(tiny_checkpoint: Path) -> None:
    (tiny_checkpoint / WEIGHTS_FILE).write_bytes(b"<html>not a safetensors file</html>")
    assert "is truncated or corrupt" in _load_error(tiny_checkpoint)


def test_empty_weights(tiny_checkpoint: Path) -> None:
    (tiny_checkpoint / WEIGHTS_FILE).write_bytes(b"")
    assert "is truncated or corrupt (Error while deserializing header" in _load_error(tiny_checkpoint)


def test_malformed_json(tiny_checkpoint: Path) -> None:
    (tiny_checkpoint / CONFIG_FILE).write_text('{"name": "x",')
    msg = _load_error(tiny_checkpoint)
    assert msg.startswith(f"{tiny_checkpoint / CONFIG_FILE}: config.json is not valid JSON")


def _edit_config(directory: Path, edit: Callable[[dict[str, Any]], Any]) -> None:
    path = directory / CONFIG_FILE
    d = json.loads(path.read_text())
    edit(d)
    path.write_text(json.dumps(d))


def test_unknown_config_version(tiny_checkpoint: Path) -> None:
    _edit_config(tiny_checkpoint, lambda d: d.update(format_version=7))
    assert "config format_version 7 is not supported (this SynthMRI reads version 1)" in _load_error(
        tiny_checkpoint
    )


def test_config_inconsistent_with_its_channel_set(tiny_checkpoint: Path) -> None:
    _edit_config(tiny_checkpoint, lambda d: d.update(channel_set="t1ce"))
    assert "model.in_channels=2 but channel set 't1ce' has 1 channels" in _load_error(tiny_checkpoint)


def test_weights_for_another_channel_set(tiny_checkpoint: Path, tmp_path: Path) -> None:
    # 5-channel weights next to a 2-channel config: the first conv names the mismatch.
    five = tmp_path / "five"
    build_tiny_checkpoint(five, channel_set="t1+t1ce+t2+flair+seg")
    (tiny_checkpoint / WEIGHTS_FILE).write_bytes((five / WEIGHTS_FILE).read_bytes())
    assert _load_error(tiny_checkpoint) == (
        "weights take 5 input channels but channel set 't1ce+seg' has 2 (t1ce, seg)"
    )


def test_output_channel_mismatch(tiny_checkpoint: Path) -> None:
    path = tiny_checkpoint / WEIGHTS_FILE
    tensors = load_file(str(path))
    # The file stores tensors sorted by name; the network's own order finds its last conv.
    model_order = load_checkpoint(tiny_checkpoint).model.state_dict()
    last = [k for k, v in model_order.items() if v.ndim == 4][-1]
    bias = last.rsplit(".", 1)[0] + ".bias"
    tensors[last] = tensors[last][:2].clone()
    tensors[bias] = tensors[bias][:2].clone()
    save_file(tensors, str(path))
    assert _load_error(tiny_checkpoint) == (
        "weights produce 2 output channels but channel set 't1ce+seg' with learn_sigma=True needs 4"
    )


def test_shape_mismatch(tiny_checkpoint: Path) -> None:
    _edit_config(tiny_checkpoint, lambda d: d["model"].update(model_channels=32))
    msg = _load_error(tiny_checkpoint)
    assert msg.startswith("tensor '") and "in the model config.json describes" in msg


def test_missing_and_unexpected_tensors(tiny_checkpoint: Path) -> None:
    path = tiny_checkpoint / WEIGHTS_FILE
    tensors = load_file(str(path))
    first = next(iter(tensors))
    tensors["extra.weight"] = torch.zeros(3)
    del tensors[first]
    save_file(tensors, str(path))
    msg = _load_error(tiny_checkpoint)
    assert msg.startswith("weights do not match the 'tiny-t1ce+seg' architecture in config.json: tensors ")
    assert f"1 missing (e.g. {first!r})" in msg and "1 unexpected (e.g. 'extra.weight')" in msg


def test_integer_weights_rejected(tiny_checkpoint: Path) -> None:
    path = tiny_checkpoint / WEIGHTS_FILE
    tensors = load_file(str(path))
    key = next(iter(tensors))
    tensors[key] = tensors[key].to(torch.int32)
    save_file(tensors, str(path))
    assert _load_error(tiny_checkpoint) == f"tensor {key!r} has dtype torch.int32, expected a float type"


def test_save_refuses_invalid_config(tiny_checkpoint: Path, tmp_path: Path) -> None:
    from model.checkpoint import save_checkpoint

    ckpt = load_checkpoint(tiny_checkpoint)
    bad = replace(ckpt.config, channel_set="t1ce")
    with pytest.raises(CheckpointError, match=r"refusing to save an invalid config: model\.in_channels=2"):
        save_checkpoint(tmp_path / "bad", ckpt.model.state_dict(), bad)
    assert not (tmp_path / "bad" / WEIGHTS_FILE).exists()


def test_loads_onto_requested_device_dtype(tiny_checkpoint: Path) -> None:
    ckpt = load_checkpoint(tiny_checkpoint, device="cpu")
    assert {p.dtype for p in ckpt.model.parameters()} == {torch.float32}
    assert {p.device.type for p in ckpt.model.parameters()} == {"cpu"}
    assert ckpt.path == tiny_checkpoint
