"""Checkpoint format: a directory with `model.safetensors` (EMA weights) and `config.json`.

`config.json` is `CheckpointConfig.to_json()`, so loading needs no flags and the API can
read a checkpoint's description without torch (`read_config` imports no torch). Every
failure to load is a `CheckpointError` whose message is one line a person can act on.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from model.config import CheckpointConfig, ConfigError
from synthmri.atomic import atomic_write
from synthmri.hashing import checkpoint_sha256

if TYPE_CHECKING:
    import torch

    from model.diffusion import GaussianDiffusion

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not match its config (one-line reason)."""


@dataclass
class LoadedCheckpoint:
    """A checkpoint ready to sample: the float32 network in eval mode on its device."""

    model: torch.nn.Module
    diffusion: GaussianDiffusion
    config: CheckpointConfig
    sha256: str
    path: Path
    _prepared: dict[tuple[str, str], Callable[..., Any]] = field(default_factory=dict, repr=False)

    def model_fn(self, device: str | torch.device, precision: str = "auto") -> Callable[..., Any]:
        """The optimised `model_fn(x_t, t)` for (device, precision), prepared once and cached.

        `prepare_for_inference` converts a network in place (dtype, layout), so each
        (device, precision) gets its own copy and `self.model` stays the float32 network.
        """
        import torch

        from model.inference import prepare_for_inference

        key = (str(torch.device(device)), precision)
        if key not in self._prepared:
            # Weights made under inference mode (a caller's) could not be used in a differentiated
            # call (reconstruction guidance), so the copy is prepared outside it.
            with torch.inference_mode(False):
                net = copy.deepcopy(self.model)
                self._prepared[key] = prepare_for_inference(net, torch.device(device), precision=precision)
        return self._prepared[key]


def save_checkpoint(
    directory: str | Path, state_dict: Mapping[str, torch.Tensor], config: CheckpointConfig
) -> str:
    """Write weights then config (each atomically) and return the checkpoint sha256.

    The config goes last: a model registry that lists directories by their config.json
    never sees a new checkpoint whose weights are still being written.
    """
    from safetensors.torch import save_file

    try:
        config.validate()
    except ConfigError as e:
        raise CheckpointError(f"refusing to save an invalid config: {e}") from None
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    # safetensors refuses shared storage and non-contiguous views; own copies on CPU avoid both.
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in state_dict.items()}
    # One metadata key only: safetensors writes metadata from a Rust HashMap in random order,
    # so several keys would make the bytes (and the sha256) of identical weights differ.
    metadata = {"format": "pt"}
    atomic_write(directory / WEIGHTS_FILE, lambda p: save_file(tensors, str(p), metadata=metadata))
    text = config.to_json() + "\n"
    atomic_write(directory / CONFIG_FILE, lambda p: p.write_text(text, encoding="utf-8"))
    return checkpoint_sha256(directory)


def _require_files(directory: Path) -> None:
    if not directory.exists():
        raise CheckpointError(f"checkpoint directory {directory} does not exist")
    if not directory.is_dir():
        raise CheckpointError(f"checkpoint {directory} is not a directory")
    for name in (WEIGHTS_FILE, CONFIG_FILE):
        if not (directory / name).is_file():
            raise CheckpointError(f"checkpoint {directory} has no {name}")


def read_config(directory: str | Path) -> CheckpointConfig:
    """The checkpoint's config, validated; needs no torch."""
    directory = Path(directory)
    if not directory.is_dir():
        raise CheckpointError(f"checkpoint directory {directory} does not exist")
    path = directory / CONFIG_FILE
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {directory} has no {CONFIG_FILE}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise CheckpointError(f"cannot read {path}: {e}") from None
    try:
        return CheckpointConfig.from_json(text)
    except ConfigError as e:
        raise CheckpointError(f"{path}: {e}") from None


def _read_weights(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device="cpu")
    except SafetensorError as e:
        raise CheckpointError(f"{path} is truncated or corrupt ({_one_line(e)})") from None
    except OSError as e:
        raise CheckpointError(f"cannot read {path}: {_one_line(e)}") from None


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split())


def _check_tensors(
    weights: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor], config: CheckpointConfig
) -> None:
    """Compare the file's tensors with the network the config describes; raise the first problem."""
    missing = [k for k in expected if k not in weights]
    unexpected = [k for k in weights if k not in expected]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {missing[0]!r})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {unexpected[0]!r})")
        raise CheckpointError(
            f"weights do not match the {config.name!r} architecture in config.json: "
            f"tensors {' and '.join(parts)}"
        )
    conv_names = [k for k, v in expected.items() if v.ndim == 4]
    n = len(config.channels)
    for key, ref in expected.items():
        got = weights[key]
        if tuple(got.shape) == tuple(ref.shape):
            continue
        # The first and last convolutions carry the channel count: name the channel set.
        if conv_names and key == conv_names[0] and got.ndim == 4 and got.shape[1] != ref.shape[1]:
            raise CheckpointError(
                f"weights take {got.shape[1]} input channels but channel set "
                f"{config.channel_set!r} has {n} ({', '.join(config.channels)})"
            )
        if conv_names and key == conv_names[-1] and got.ndim == 4 and got.shape[0] != ref.shape[0]:
            raise CheckpointError(
                f"weights produce {got.shape[0]} output channels but channel set "
                f"{config.channel_set!r} with learn_sigma={config.diffusion.learn_sigma} "
                f"needs {ref.shape[0]}"
            )
        raise CheckpointError(
            f"tensor {key!r} has shape {tuple(got.shape)} in the weights but "
            f"{tuple(ref.shape)} in the model config.json describes"
        )
    for key, got in weights.items():
        if expected[key].is_floating_point() and not got.is_floating_point():
            raise CheckpointError(f"tensor {key!r} has dtype {got.dtype}, expected a float type")


def load_checkpoint(directory: str | Path, device: str | torch.device = "cpu") -> LoadedCheckpoint:
    """Validate and load a checkpoint; the model is in eval mode on `device`, float32."""
    import torch

    from model.diffusion import GaussianDiffusion
    from model.unet import UNetModel

    directory = Path(directory)
    _require_files(directory)
    config = read_config(directory)
    weights = _read_weights(directory / WEIGHTS_FILE)
    model = UNetModel(config.model)
    expected = model.state_dict()
    _check_tensors(weights, expected, config)
    model.load_state_dict({k: v.to(torch.float32) for k, v in weights.items()}, strict=True)
    model.eval().requires_grad_(False)
    model.to(device)
    return LoadedCheckpoint(
        model=model,
        diffusion=GaussianDiffusion.from_config(config.diffusion),
        config=config,
        sha256=checkpoint_sha256(directory),
        path=directory,
    )
