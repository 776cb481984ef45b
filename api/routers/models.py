"""GET /v1/models: the checkpoints this server can sample from."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from pydantic import BaseModel, Field

from api.deps import ServicesDep
from synthmri.registry import scan_models

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


class ModelList(BaseModel):
    models: list[ModelPublic]


@router.get("", response_model=ModelList, summary="List the installed models")
def list_models(services: ServicesDep) -> ModelList:
    """Public: model names and provenance hold no secrets, and the web page lists them before login."""
    models = scan_models(services.settings.models_dir)
    return ModelList(models=[ModelPublic(**m.public()) for m in models.values()])
