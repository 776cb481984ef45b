"""Training configuration: one frozen `TrainConfig` and the training presets.

A training preset names a model preset from `model/config.py` (architecture +
diffusion) and the recipe that goes with it (batch, micro-batch, LR, EMA, ...).
Every field can be overridden on the command line (`--field value`); the CLI flags
are generated from the dataclass fields, so there is one list of knobs.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
from dataclasses import asdict, dataclass, fields, replace
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

from model.config import PRESETS as MODEL_PRESETS
from model.config import ConfigError, Preset, get_preset
from synthmri.channels import CHANNEL_SETS

Precision = Literal["auto", "fp32", "bf16", "fp16"]


@dataclass(frozen=True)
class TrainConfig:
    """Everything one training run needs; stored in train_state.pt and the checkpoint provenance."""

    preset: str = "tiny"  # model preset (model/config.py) + the recipe defaults below
    channels: str = ""  # channel set; "" = the preset's
    prediction: str = ""  # what the network predicts, "eps" or "v"; "" = the preset's
    weighting: str = ""  # L_simple weighting, "eps", "v" or "min-snr"; "" = the preset's
    min_snr_gamma: float = 0.0  # γ of the min-SNR weighting; 0 = the preset's
    data: str = ""  # BraTS-layout folder, prepared PNG folders, or phantoms
    out: str = ""  # run directory: checkpoint, train_state.pt, metrics.jsonl, samples/
    resume: str = ""  # run directory to resume from (its train_state.pt)
    steps: int = 1000  # optimiser steps in total (the LR schedule spans these)
    global_batch: int = 8  # samples per optimiser step, summed over all ranks
    micro_batch: int = 8  # samples per forward/backward on one rank
    lr: float = 1e-4
    warmup: int = 0  # linear LR warm-up steps
    lr_schedule: Literal["constant", "cosine"] = "constant"
    min_lr: float = 0.0  # floor of the cosine schedule
    weight_decay: float = 0.0
    grad_clip: float = 1.0  # max global grad norm; 0 disables clipping
    ema_decay: float = 0.9999
    ema_warmup: bool = True  # decay = min(ema_decay, (1+n)/(10+n)) so short runs are not stuck at init
    # auto = bf16 on CUDA with bf16 and on CPUs with bf16 dot products (AVX512-BF16/AMX),
    # fp16 on older CUDA, else fp32
    precision: Precision = "auto"
    channels_last: Literal["auto", "on", "off"] = "auto"  # auto = on with bf16/fp16 autocast
    compile: bool = False  # torch.compile the model
    log_every: int = 10
    sample_every: int = 0  # steps between sample-grid PNGs; 0 = only at the end
    sample_count: int = 4
    sample_sampler: str = "dpm++sde"
    sample_steps: int = 20
    ckpt_every: int = 500  # steps between checkpoints (+ one at the end)
    val_batches: int = 2  # global batches of fixed-noise validation loss per checkpoint; 0 = off
    val_samples: int = 16  # samples per checkpoint for the evaluation's quick figures; 0 = off
    max_minutes: float = 0.0  # stop (and checkpoint) after this wall time; 0 = no budget
    stop_at: int = 0  # stop (and checkpoint) after this step, resumable; 0 = run to `steps`
    seed: int = 0
    val_fraction: float = 0.1
    mode: Literal["percentile", "research"] = "percentile"
    tumour_fraction: float = -1.0  # fraction of tumour-containing slices; < 0 = natural
    hflip: bool = False  # random left-right flips of training slices
    cache_dir: str = ""  # slice cache; "" = <data>/.synthmri-cache
    slice_pattern: str = ""  # PNG folders: regex with a (?P<subject>...) group; "" = the built-in names
    skip_bad_subjects: bool = False  # leave out (and list) subjects whose own files have a problem
    num_workers: int = 0  # DataLoader worker processes per rank
    device: Literal["auto", "cpu", "cuda"] = "auto"
    progress: bool = True  # tqdm bar on the master rank

    @property
    def model_preset(self) -> Preset:
        """The model preset with this run's channel set and diffusion overrides applied."""
        preset = get_preset(self.preset, self.channels or None)
        overrides: dict[str, Any] = {}
        if self.prediction:
            overrides["prediction"] = self.prediction
        if self.weighting:
            overrides["weighting"] = self.weighting
        if self.min_snr_gamma:
            overrides["min_snr_gamma"] = self.min_snr_gamma
        return replace(preset, diffusion=replace(preset.diffusion, **overrides)) if overrides else preset

    @property
    def image_size(self) -> int:
        return self.model_preset.model.image_size

    @property
    def channel_set(self) -> str:
        return self.model_preset.channel_set

    def validate(self, world_size: int = 1) -> None:
        if self.preset not in MODEL_PRESETS:
            raise ConfigError(f"unknown preset {self.preset!r}; known: {', '.join(MODEL_PRESETS)}")
        if self.channels and self.channels not in CHANNEL_SETS:
            raise ConfigError(f"unknown channel set {self.channels!r}; known: {', '.join(CHANNEL_SETS)}")
        self.model_preset.diffusion.validate()
        if self.steps < 1:
            raise ConfigError("steps must be ≥ 1")
        if self.global_batch < 1 or self.micro_batch < 1:
            raise ConfigError("global_batch and micro_batch must be ≥ 1")
        if self.global_batch % world_size:
            raise ConfigError(
                f"global_batch {self.global_batch} is not divisible by the world size {world_size}"
            )
        if self.lr <= 0 or self.min_lr < 0 or self.min_lr > self.lr:
            raise ConfigError("need lr > 0 and 0 ≤ min_lr ≤ lr")
        if self.warmup < 0:
            raise ConfigError("warmup must be ≥ 0")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ConfigError("ema_decay must be in [0, 1)")
        if not 0.0 < self.val_fraction < 1.0:
            raise ConfigError("val_fraction must be in (0, 1)")
        for name in ("log_every", "ckpt_every"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be ≥ 1")
        if self.precision not in get_args(Precision):
            raise ConfigError(f"precision must be one of {', '.join(get_args(Precision))}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# Recipes per preset. The research runs trained at bs=128 with micro-batches of 6–7
# on one GPU; 8 divides 128 and every power-of-two world size, so no rank ever sees
# a ragged last micro-batch.
TRAIN_PRESETS: dict[str, dict[str, Any]] = {
    "research-1ch": dict(global_batch=32, micro_batch=8, lr=1e-4, steps=100_000, ckpt_every=5000,
                         sample_every=5000, log_every=100),
    "research-2ch": dict(global_batch=128, micro_batch=8, lr=1e-4, steps=100_000, ckpt_every=5000,
                         sample_every=5000, log_every=100),
    "research-5ch": dict(global_batch=32, micro_batch=8, lr=1e-4, steps=100_000, ckpt_every=5000,
                         sample_every=5000, log_every=100),
    "base-128": dict(global_batch=32, micro_batch=8, lr=1e-4, steps=50_000, ckpt_every=2500),
    "base-64": dict(global_batch=32, micro_batch=16, lr=1e-4, steps=50_000, ckpt_every=2500),
    # The shipped CPU demo gets minutes of a shared 2-core CPU: a high constant LR (the run
    # is stopped by a wall-time budget, so a schedule tied to `steps` could be cut off
    # half-way) with a fast EMA to average out the late-step noise; batch 8 rather than
    # 16 because at a fixed budget twice the updates learn the anatomy sooner.
    "demo": dict(global_batch=8, micro_batch=8, lr=6e-4, warmup=50, lr_schedule="constant",
                 ema_decay=0.995, steps=3000, ckpt_every=250, sample_every=500, log_every=25,
                 tumour_fraction=0.5, hflip=True),
    "tiny": dict(global_batch=8, micro_batch=8, lr=1e-3, steps=20, ckpt_every=10, log_every=1,
                 ema_decay=0.9, sample_count=2, sample_steps=5),
}


def preset_config(name: str, **overrides: Any) -> TrainConfig:
    """The TrainConfig of a preset with field overrides applied."""
    if name not in MODEL_PRESETS:
        raise ConfigError(f"unknown preset {name!r}; known: {', '.join(MODEL_PRESETS)}")
    values = dict(TRAIN_PRESETS.get(name, {}))
    values.update(overrides)
    values["preset"] = name
    unknown = set(values) - {f.name for f in fields(TrainConfig)}
    if unknown:
        raise ConfigError(f"TrainConfig has no fields {sorted(unknown)}")
    return TrainConfig(**values)


def from_dict(values: dict[str, Any]) -> TrainConfig:
    """Rebuild a TrainConfig saved with `to_dict` (unknown keys are an error)."""
    unknown = set(values) - {f.name for f in fields(TrainConfig)}
    if unknown:
        raise ConfigError(f"saved training config has unknown fields {sorted(unknown)}")
    return TrainConfig(**values)


def _field_type(hint: Any) -> tuple[Any, tuple[Any, ...] | None]:
    """The argparse `type` and `choices` for a dataclass field's type hint."""
    origin = get_origin(hint)
    if origin in (Union, types.UnionType):
        args = [a for a in get_args(hint) if a is not type(None)]
        return _field_type(args[0])
    if origin is Literal:
        choices = get_args(hint)
        return type(choices[0]), choices
    return hint, None


def _parse_bool(text: str) -> bool:
    lowered = text.lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {text!r}")


def add_config_arguments(parser: argparse.ArgumentParser, skip: tuple[str, ...] = ()) -> None:
    """One `--field value` flag per TrainConfig field (`--flag` alone for a true boolean);
    unset flags stay absent from the namespace."""
    hints = get_type_hints(TrainConfig)
    for f in fields(TrainConfig):
        if f.name in skip:
            continue
        kind, choices = _field_type(hints[f.name])
        # a bare boolean flag means true, like the store_true flags of the other commands
        bare: dict[str, Any] = {"nargs": "?", "const": True} if kind is bool else {}
        flag = "--" + f.name.replace("_", "-")
        default = f.default if f.default is not dataclasses.MISSING else None
        parser.add_argument(
            flag,
            dest=f.name,
            type=_parse_bool if kind is bool else kind,
            choices=choices,
            default=argparse.SUPPRESS,
            metavar=f.name.upper() if choices is None else None,
            help=f"(default: {default!r})",
            **bare,
        )


def config_from_args(ns: argparse.Namespace, base: TrainConfig | None = None) -> TrainConfig:
    """Apply the flags the user actually gave to `base` (or to the chosen preset's defaults)."""
    given = {f.name: getattr(ns, f.name) for f in fields(TrainConfig) if hasattr(ns, f.name)}
    if base is not None:
        return replace(base, **given)
    preset = given.pop("preset", TrainConfig.preset)
    return preset_config(preset, **given)
