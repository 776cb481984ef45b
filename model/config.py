"""Model, diffusion and checkpoint configuration (torch-free) and the presets.

The checkpoint's config.json is `CheckpointConfig.to_json()`; loading a checkpoint
needs no flags because everything that shapes the network and the diffusion is here.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any, Literal

from synthmri.channels import CHANNEL_SETS, DEFAULT_LABEL_LEVELS, channels_of

CONFIG_FORMAT_VERSION = 1
PREDICTIONS = ("eps", "v")
WEIGHTINGS = ("eps", "v", "min-snr")


class ConfigError(ValueError):
    """A config that cannot describe a valid model; the message says which field."""


@dataclass(frozen=True)
class ModelConfig:
    """UNet hyper-parameters (improved-diffusion family)."""

    image_size: int = 64
    in_channels: int = 1
    out_channels: int = 2  # 2 × in_channels when σ is learned
    model_channels: int = 128
    channel_mult: tuple[int, ...] = (1, 2, 3, 4)
    num_res_blocks: int = 2
    attention_resolutions: tuple[int, ...] = (16,)  # feature-map sizes in pixels
    num_heads: int = 1
    num_head_channels: int = -1  # > 0 overrides num_heads
    dropout: float = 0.0
    use_scale_shift_norm: bool = True
    resblock_updown: bool = False
    num_groups: int = 32

    def validate(self) -> None:
        if self.image_size % (2 ** (len(self.channel_mult) - 1)):
            raise ConfigError(
                f"image_size {self.image_size} is not divisible by 2^{len(self.channel_mult) - 1} "
                f"(channel_mult {self.channel_mult})"
            )
        for m in self.channel_mult:
            if (self.model_channels * m) % self.num_groups:
                raise ConfigError(
                    f"width {self.model_channels}×{m} is not divisible by num_groups {self.num_groups}"
                )
        if self.in_channels < 1 or self.out_channels < 1:
            raise ConfigError("in_channels and out_channels must be ≥ 1")


@dataclass(frozen=True)
class DiffusionConfig:
    """Gaussian diffusion process: schedule, parameterisation and loss."""

    steps: int = 1000
    noise_schedule: Literal["linear", "cosine"] = "linear"
    learn_sigma: bool = True  # learned-range variance (Nichol & Dhariwal 2021, eq. 15)
    loss: Literal["hybrid", "mse"] = "hybrid"  # hybrid = L_simple + λ·L_vlb
    lambda_vlb: float = 0.001
    # What the network's first C output channels predict: the noise ε (Ho et al.) or the
    # velocity v = α_t ε − σ_t x_0 (Salimans & Ho 2022). With ε the x̂_0 error is the ε error
    # times σ_t/α_t, so at high noise a small ε error wrecks the slice layout; v stays bounded.
    prediction: Literal["eps", "v"] = "eps"
    # Per-timestep weight of the L_simple term, written as a weight on ‖x_0 − x̂_0‖²:
    # "eps" = SNR_t (plain ε-MSE), "v" = SNR_t + 1 (plain v-MSE), "min-snr" = min(SNR_t, γ)
    # (Hang et al. 2023), which caps the weight of the nearly clean steps.
    weighting: Literal["eps", "v", "min-snr"] = "eps"
    min_snr_gamma: float = 5.0

    def validate(self) -> None:
        if self.steps < 2:
            raise ConfigError("diffusion steps must be ≥ 2")
        if self.noise_schedule not in ("linear", "cosine"):
            raise ConfigError(f"unknown noise_schedule {self.noise_schedule!r}")
        if self.loss not in ("hybrid", "mse"):
            raise ConfigError(f"unknown loss {self.loss!r}")
        if self.loss == "hybrid" and not self.learn_sigma:
            raise ConfigError("the hybrid loss needs learn_sigma=true")
        if self.prediction not in PREDICTIONS:
            raise ConfigError(f"unknown prediction {self.prediction!r}; expected one of {PREDICTIONS}")
        if self.weighting not in WEIGHTINGS:
            raise ConfigError(f"unknown weighting {self.weighting!r}; expected one of {WEIGHTINGS}")
        if not self.min_snr_gamma > 0:
            raise ConfigError(f"min_snr_gamma must be > 0, got {self.min_snr_gamma}")


@dataclass(frozen=True)
class Normalisation:
    """How voxel intensities were mapped to the model range [-1, 1]."""

    method: Literal["percentile", "research"] = "percentile"
    low_percentile: float = 0.5
    high_percentile: float = 99.5


@dataclass(frozen=True)
class CheckpointConfig:
    """Everything `config.json` holds; readable without torch."""

    name: str
    channel_set: str
    model: ModelConfig
    diffusion: DiffusionConfig
    normalisation: Normalisation = field(default_factory=Normalisation)
    label_levels: dict[int, float] = field(default_factory=lambda: dict(DEFAULT_LABEL_LEVELS))
    provenance: dict[str, Any] = field(default_factory=dict)
    format_version: int = CONFIG_FORMAT_VERSION

    @property
    def channels(self) -> tuple[str, ...]:
        return channels_of(self.channel_set)

    @property
    def image_size(self) -> int:
        return self.model.image_size

    def validate(self) -> None:
        if self.format_version != CONFIG_FORMAT_VERSION:
            raise ConfigError(
                f"config format_version {self.format_version} is not supported "
                f"(this SynthMRI reads version {CONFIG_FORMAT_VERSION})"
            )
        if self.channel_set not in CHANNEL_SETS:
            raise ConfigError(f"unknown channel_set {self.channel_set!r}")
        self.model.validate()
        self.diffusion.validate()
        n = len(self.channels)
        if self.model.in_channels != n:
            raise ConfigError(
                f"model.in_channels={self.model.in_channels} but channel set "
                f"{self.channel_set!r} has {n} channels"
            )
        expected_out = n * (2 if self.diffusion.learn_sigma else 1)
        if self.model.out_channels != expected_out:
            raise ConfigError(
                f"model.out_channels={self.model.out_channels}, expected {expected_out} "
                f"(learn_sigma={self.diffusion.learn_sigma})"
            )
        if sorted(self.label_levels) != [0, 1, 2, 4]:
            raise ConfigError("label_levels must give a level for labels 0, 1, 2 and 4")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["label_levels"] = {str(k): v for k, v in self.label_levels.items()}
        d["image_size"] = self.image_size
        d["channels"] = list(self.channels)
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> CheckpointConfig:
        try:
            version = int(d.get("format_version", -1))
            if version != CONFIG_FORMAT_VERSION:
                raise ConfigError(
                    f"config format_version {d.get('format_version')!r} is not supported "
                    f"(this SynthMRI reads version {CONFIG_FORMAT_VERSION})"
                )
            model = _build(ModelConfig, d["model"])
            diffusion = _build(DiffusionConfig, d["diffusion"])
            norm = _build(Normalisation, d.get("normalisation", {}))
            levels = {int(k): float(v) for k, v in d.get("label_levels", DEFAULT_LABEL_LEVELS).items()}
            cfg = cls(
                name=str(d["name"]),
                channel_set=str(d["channel_set"]),
                model=model,
                diffusion=diffusion,
                normalisation=norm,
                label_levels=levels,
                provenance=dict(d.get("provenance", {})),
                format_version=version,
            )
        except KeyError as e:
            raise ConfigError(f"config is missing the field {e.args[0]!r}") from None
        except (TypeError, ValueError) as e:
            if isinstance(e, ConfigError):
                raise
            raise ConfigError(f"config has a malformed value: {e}") from None
        cfg.validate()
        return cfg

    @classmethod
    def from_json(cls, text: str) -> CheckpointConfig:
        try:
            d = json.loads(text)
        except json.JSONDecodeError as e:
            raise ConfigError(f"config.json is not valid JSON ({e.msg} at line {e.lineno})") from None
        if not isinstance(d, dict):
            raise ConfigError("config.json must hold a JSON object")
        return cls.from_dict(d)


def _build(kind: type, values: dict[str, Any]) -> Any:
    names = {f.name for f in fields(kind)}
    unknown = set(values) - names
    if unknown:
        raise ConfigError(f"{kind.__name__} has unknown fields {sorted(unknown)}")
    kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in values.items()}
    return kind(**kwargs)


# ---------------------------------------------------------------------------
# Presets. The research experiments all used image 256, base width 128, 2 res
# blocks, attention at 16×16 with one head, learned σ, linear schedule, T=1000.

# The presets' diffusion recipe. With ε-prediction the layout of a slice is never learned:
# at t ≥ 950 its x̂_0 was worse than the mean image, which the fast samplers then sharpen
# into noise. v-prediction bounds the x̂_0 error at every noise level, and the plain v-loss
# (x̂_0 error weighted by SNR + 1) still trains the noisiest steps at weight ≈ 1, where
# min-SNR-γ gives them ≈ SNR, next to nothing (measured in docs/evaluation.md).
RECIPE: dict[str, Any] = {"prediction": "v", "weighting": "v"}

_CHANNEL_MULT = {256: (1, 1, 2, 2, 4, 4), 128: (1, 1, 2, 3, 4), 64: (1, 2, 3, 4), 32: (1, 2, 2)}


@dataclass(frozen=True)
class Preset:
    """An architecture + diffusion recipe with a default channel set."""

    name: str
    channel_set: str
    model: ModelConfig
    diffusion: DiffusionConfig
    description: str

    def with_channels(self, channel_set: str) -> Preset:
        """The same architecture for another channel set (in/out channels follow)."""
        n = len(channels_of(channel_set))
        out = n * (2 if self.diffusion.learn_sigma else 1)
        return replace(
            self,
            channel_set=channel_set,
            model=replace(self.model, in_channels=n, out_channels=out),
        )


def _preset(
    name: str,
    channel_set: str,
    size: int,
    description: str,
    diffusion: DiffusionConfig | None = None,
    **model_kw: Any,
) -> Preset:
    n = len(channels_of(channel_set))
    model_args: dict[str, Any] = dict(
        image_size=size,
        in_channels=n,
        out_channels=2 * n,
        model_channels=128,
        channel_mult=_CHANNEL_MULT[size],
        num_res_blocks=2,
        attention_resolutions=(16,),
        num_heads=1,
    )
    model_args.update(model_kw)
    diffusion = diffusion or DiffusionConfig(**RECIPE)
    return Preset(name, channel_set, ModelConfig(**model_args), diffusion, description)


PRESETS: dict[str, Preset] = {
    p.name: p
    for p in (
        _preset("research-1ch", "t1ce", 256, "research experiment: T1CE, 256²"),
        _preset("research-2ch", "t1ce+seg", 256, "research experiment: T1CE + mask, 256²"),
        _preset("research-5ch", "t1+t1ce+t2+flair+seg", 256, "research experiment: 4 modalities + mask"),
        _preset("base-128", "t1ce+seg", 128, "research architecture at 128²"),
        _preset("base-64", "t1ce+seg", 64, "research architecture at 64²"),
        _preset(
            "demo",
            "t1+t1ce+t2+flair+seg",
            64,
            "small 64² model for the shipped CPU demo",
            # At 64² the linear schedule spends its last steps on near-pure noise; the cosine
            # schedule (Nichol & Dhariwal 2021, §3.2) learns faster for a short CPU run.
            diffusion=DiffusionConfig(noise_schedule="cosine", **RECIPE),
            model_channels=32,
            channel_mult=(1, 2, 2, 4),
            num_res_blocks=1,
            attention_resolutions=(16, 8),
            num_groups=8,
        ),
        _preset(
            "tiny",
            "t1ce+seg",
            32,
            "very small 32² model for tests",
            model_channels=16,
            channel_mult=(1, 2, 2),
            num_res_blocks=1,
            attention_resolutions=(8,),
            num_groups=8,
        ),
    )
}


def get_preset(name: str, channel_set: str | None = None) -> Preset:
    """A preset by name, optionally re-targeted to another channel set."""
    try:
        p = PRESETS[name]
    except KeyError:
        raise ConfigError(f"unknown preset {name!r}; known: {', '.join(PRESETS)}") from None
    return p.with_channels(channel_set) if channel_set and channel_set != p.channel_set else p
