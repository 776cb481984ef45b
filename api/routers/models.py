"""GET /v1/models: the checkpoints this server can sample from, and those it cannot."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from pydantic import BaseModel, Field

from api.deps import ServicesDep

router = APIRouter(prefix="/v1/models", tags=["models"])


class Recommended(BaseModel):
    sampler: str
    steps: int


class ModelPublic(BaseModel):
    name: str
    channel_set: str
    channels: list[str]
    image_size: int
    diffusion_steps: int
    samplers: list[str]
    default_steps: dict[str, int]
    provenance: dict[str, Any]
    sha256: str
    recommended: Recommended | None = Field(
        description="The sampler and steps the model's evaluation recommends; requests without "
        "`sampler` use it. Null when the model has no current model card (eval.json)."
    )
    card: dict[str, Any] | None = Field(
        description="The model card written by `synthmri eval`: headline quality figures against real "
        "held-out data, the sampler table and the downstream segmentation study."
    )


class UnavailableModel(BaseModel):
    name: str
    reason: str = Field(description="Why requests cannot use it (e.g. its weights failed verification)")
    channel_set: str | None = Field(description="Its channel set, when its config.json can be read")
    sha256: str | None = Field(description="Its checkpoint sha256, when known")


class ModelList(BaseModel):
    models: list[ModelPublic] = Field(description="Models requests can use")
    unavailable: list[UnavailableModel] = Field(
        default_factory=list,
        description="Model directories that failed verification, or whose checkpoint a worker could "
        "not load; they are never chosen for a request.",
    )


@router.get("", response_model=ModelList, summary="List the installed models")
async def list_models(services: ServicesDep) -> ModelList:
    """Public: model names and provenance hold no secrets, and the web page lists them before login.

    The workers' load failures come from a view refreshed in the background, so this
    answers at once even while Redis is stalled (with the last faults it read)."""
    registry = (await services.models.scan()).without_faults(await services.faults.current())
    return ModelList(
        models=[ModelPublic(**m.public()) for m in registry.models.values()],
        unavailable=[UnavailableModel(**u.public()) for u in registry.unavailable.values()],
    )
