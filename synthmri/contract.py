"""The job contract shared by the API and the worker (torch-free, FastAPI-free).

A request names a model or a channel set; the API resolves it into a `JobSpec`
(model, checkpoint sha256, seed, sampler, steps, index ranges) that is stored in Redis
and never changes. The worker reads the spec by job id; the manifest records it.
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from enum import StrEnum
from typing import Annotated, Any, Literal, cast, get_args

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, model_validator
from pydantic_core import PydanticCustomError

from synthmri.channels import CHANNEL_SETS, MODALITIES, SEG

TASK_SAMPLE_RANGE = "synthmri.sample_range"
QUEUE = "synthmri"

# Mirrors model.samplers.DEFAULT_STEPS (tests/api/test_contract.py asserts they agree);
# duplicated so that the API never imports torch.
DEFAULT_STEPS: dict[str, int] = {"ddpm": 1000, "ddim": 50, "dpm++": 20, "dpm++sde": 20}
SAMPLERS: tuple[str, ...] = ("dpm++", "dpm++sde", "ddim", "ddpm")
MAX_SEED = 2**63 - 1
# Reconstruction guidance of known channels (model.conditioning): 16 measured best with the demo
# model; far above a few hundred the trained network's gradients only add noise.
DEFAULT_GUIDANCE = 16.0
MAX_GUIDANCE = 1000.0

Sampler = Literal["dpm++", "dpm++sde", "ddim", "ddpm"]
OutputFormat = Literal["nifti", "png", "npz", "nnunet"]
DEFAULT_FORMATS: tuple[OutputFormat, ...] = ("nifti", "png")
NNUNET: OutputFormat = "nnunet"
JOB_ID_PATTERN = r"^[0-9a-f]{16}$"


def nnunet_unfit(channels: Sequence[str]) -> str | None:
    """Why jobs with these channels cannot become an nnU-Net dataset, or None when they can.

    nnU-Net trains on labels from image channels, so a job needs the seg and at least one
    modality; the same words answer a request, a download and `synthmri export-nnunet`.
    """
    with_seg = " or ".join(name for name, chans in CHANNEL_SETS.items() if SEG in chans)
    shown = "+".join(channels)
    if SEG not in channels:
        return f"no seg channel (channels {shown}): an nnU-Net dataset needs labels; use {with_seg}"
    if not any(c in MODALITIES for c in channels):
        return f"no image channel (channels {shown}): an nnU-Net dataset needs images; use {with_seg}"
    return None


def new_job_id() -> str:
    return secrets.token_hex(8)


def new_seed() -> int:
    """A seed for a request that gave none; it is recorded so the job can be repeated."""
    return secrets.randbits(63)


class JobState(StrEnum):
    queued = "queued"
    running = "running"
    succeeded = "succeeded"
    failed = "failed"
    cancelled = "cancelled"

    @property
    def terminal(self) -> bool:
        return self in TERMINAL_STATES


TERMINAL_STATES = frozenset({JobState.succeeded, JobState.failed, JobState.cancelled})
ACTIVE_STATES = frozenset({JobState.queued, JobState.running})


def _not_text(error_type: str, expected: str) -> BeforeValidator:
    """Refuse what a lax number field would convert: strings and booleans."""

    def check(value: Any) -> Any:
        if isinstance(value, str | bool):
            kind = "string" if isinstance(value, str) else "boolean"
            message = f"Input should be {expected} (a JSON number, not a {{kind}})"
            raise PydanticCustomError(error_type, message, {"kind": kind})
        return value

    return BeforeValidator(check)


NOT_TEXT = _not_text("int_type", "an integer")  # after the constraints, so the JSON schema keeps them
NUMBER_NOT_TEXT = _not_text("float_type", "a number")


class JobRequest(BaseModel):
    """What a client POSTs to /v1/jobs.

    JSON types are taken as sent: `"count": "1"` or `true` is an error rather than a guess
    at what the client meant (a number such as 4.0 is an integer, as JSON Schema says).
    """

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={"examples": [{"channels": "t1ce+seg", "count": 4, "seed": 1}]},
    )

    model: str | None = Field(
        default=None, description="A model name from GET /v1/models.", min_length=1, max_length=100
    )
    channels: str | None = Field(
        default=None,
        max_length=max(len(c) for c in CHANNEL_SETS),
        description=f"A channel set ({', '.join(CHANNEL_SETS)}). Alone it picks the model with exactly "
        "these channels or the smallest superset; with `model` it selects channels of that model.",
    )
    count: Annotated[int, Field(ge=1), NOT_TEXT] = Field(
        ..., description="Number of samples (1..the server's max_count)."
    )
    seed: Annotated[int, Field(ge=0, le=MAX_SEED), NOT_TEXT] | None = Field(
        default=None,
        description="Seed; sample i depends only on (seed, i). Random if absent.",
    )
    sampler: Sampler | None = Field(
        default=None,
        description="dpm++ (fast), ddim (deterministic) or ddpm (ancestral). Absent: the sampler the "
        "model's evaluation recommends (GET /v1/models, `recommended`), else dpm++.",
    )
    steps: Annotated[int, Field(ge=1, le=10000), NOT_TEXT] | None = Field(
        default=None,
        description="Sampling steps. Absent: the model's recommended steps when the sampler is the "
        f"recommended one, else the sampler's default {DEFAULT_STEPS}.",
    )
    formats: list[OutputFormat] = Field(
        default_factory=lambda: list(DEFAULT_FORMATS),
        min_length=1,
        description="Outputs: per sample nifti (BraTS naming) and/or png; per job npz (N×H×W×C uint8) "
        "and/or nnunet (nnunet.zip, an nnU-Net v2 raw dataset; needs nifti and a channel set with seg).",
    )
    guidance: Annotated[float, Field(ge=0, le=MAX_GUIDANCE, allow_inf_nan=False), NUMBER_NOT_TEXT] | None = (
        Field(
            default=None,
            description="Reconstruction-guidance weight for known channels, which are sent as files of "
            "a multipart/form-data request (this JSON in its `request` field). 0: the known channels "
            f"are only substituted; absent: {DEFAULT_GUIDANCE:g}. Only with files.",
        )
    )

    @model_validator(mode="after")
    def _check(self) -> JobRequest:
        if self.model is None and self.channels is None:
            raise ValueError(
                f"give `model` (see GET /v1/models) or `channels` (one of {', '.join(CHANNEL_SETS)})"
            )
        if self.channels is not None and self.channels not in CHANNEL_SETS:
            raise ValueError(f"unknown channel set {self.channels!r}; use one of {', '.join(CHANNEL_SETS)}")
        self.formats = sorted(set(self.formats), key=get_args(OutputFormat).index)
        if NNUNET in self.formats:
            if "nifti" not in self.formats:
                raise ValueError('the nnunet format is built from the NIfTI files: add "nifti" to formats')
            # A request that names a model alone is checked once the API has resolved the model.
            unfit = nnunet_unfit(CHANNEL_SETS[self.channels]) if self.channels is not None else None
            if unfit is not None:
                raise ValueError(f"the nnunet format cannot be made: {unfit}")
        return self



def resolve_sampling(
    sampler: str | None, steps: int | None, recommended: tuple[str, int] | None
) -> tuple[Sampler, int]:
    """(sampler, steps) of a request: what it names, else the model's recommendation, else defaults.

    Steps a request leaves out come from the recommendation only when the sampler is the
    recommended one (20 DPM-Solver++ steps say nothing about DDPM).
    """
    name = cast(Sampler, sampler or (recommended[0] if recommended else "dpm++"))
    if steps is not None:
        return name, steps
    if recommended is not None and recommended[0] == name:
        return name, recommended[1]
    return name, DEFAULT_STEPS[name]


GivenApplies = Literal["all", "each", "slices"]


class GivenInput(BaseModel):
    """One uploaded file of a known channel, as stored with the job."""

    channel: str
    file: str = Field(description="the uploaded bytes, under the job directory (inputs/…)")
    sha256: str = Field(description="sha256 of the uploaded bytes")
    applies: GivenApplies = Field(
        description="all: its one slice is given to every sample; each: to the one sample in `samples`; "
        "slices: slice k along the volume's last axis to sample k"
    )
    samples: list[int] = Field(description="the sample indices it is given to")
    normalisation: str = Field(description="how its values were mapped to the model range")
    orientation: str = Field(description="how its axes were matched to the outputs' orientation")


class Given(BaseModel):
    """The known channels of a job (uploaded with it) and how they steer sampling."""

    channels: list[str] = Field(description="the known channels, in model order")
    guidance: float = Field(description="reconstruction-guidance weight (0: substitution only)")
    inputs: list[GivenInput]

    def signature(self) -> str:
        """What a sampling batch must share with this job beyond model, sampler and steps."""
        return f"{'+'.join(self.channels)}@{self.guidance!r}"


class JobSpec(BaseModel):
    """The resolved, immutable description of a job (stored in Redis, read by workers)."""

    id: str
    owner: str = Field(description="sha256 of the creating API key")
    model: str
    model_sha256: str
    channel_set: str = Field(description="the model's channel set")
    channels: list[str] = Field(description="channels kept in the outputs, in model order")
    image_size: int
    count: int
    seed: int
    sampler: Sampler
    steps: int
    formats: list[OutputFormat]
    batch_size: int
    created_at: float
    request: dict[str, Any] = Field(description="the request as the client sent it")
    given: Given | None = Field(default=None, description="known channels uploaded with the request")

    def ranges(self) -> list[tuple[int, int]]:
        """Contiguous [start, stop) sample index ranges, one Celery task each."""
        return [(s, min(s + self.batch_size, self.count)) for s in range(0, self.count, self.batch_size)]


class Progress(BaseModel):
    samples_done: int = 0
    samples_total: int
    fraction: float = Field(
        default=0.0, ge=0.0, le=1.0, description="sampler steps done / all steps of the job"
    )


class Timings(BaseModel):
    created_at: float
    started_at: float | None = None
    finished_at: float | None = None
    queued_seconds: float | None = None
    run_seconds: float | None = None


class JobView(BaseModel):
    """A job as GET /v1/jobs/{id} shows it."""

    id: str
    state: JobState
    model: str
    model_sha256: str
    channels: list[str]
    count: int
    seed: int
    sampler: Sampler
    steps: int
    formats: list[OutputFormat]
    image_size: int
    progress: Progress
    timings: Timings
    given: list[str] = Field(default_factory=list, description="channels uploaded as known (not generated)")
    guidance: float | None = Field(default=None, description="reconstruction-guidance weight, with `given`")
    cancel_requested: bool = False
    error: str | None = None
    links: dict[str, str] = Field(default_factory=dict)


class Manifest(BaseModel):
    """manifest.json: everything needed to reproduce and audit a job's outputs.

    The keys shared with `synthmri sample` (synthmri.outputs.writers.make_manifest) come first;
    the service adds the job id, the request as sent, the formats and the device.
    """

    model_config = ConfigDict(extra="allow")

    format: str
    version: str = Field(description="SynthMRI software version")
    model: str
    sha256: str = Field(description="checkpoint sha256 (weights then config.json)")
    channel_set: str
    channels: list[str]
    image_size: int
    seed: int
    sampler: Sampler
    steps: int
    count: int
    indices: list[int]
    timings: dict[str, float]
    files: list[str] = Field(description="paths relative to the job directory")
    job_id: str
    request: dict[str, Any]
    formats: list[OutputFormat]
    device: str
    precision: str
    given: Given | None = Field(default=None, description="the uploaded known channels, when there were any")
