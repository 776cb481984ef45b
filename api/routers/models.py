"""GET /v1/models: the checkpoints this server can sample from."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from pydantic import BaseModel

from api.deps import ServicesDep
from synthmri.registry import scan_models

router = APIRouter(prefix="/v1/models", tags=["models"])


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


class ModelList(BaseModel):
    models: list[ModelPublic]


@router.get("", response_model=ModelList, summary="List the installed models")
def list_models(services: ServicesDep) -> ModelList:
    """Public: model names and provenance hold no secrets, and the web page lists them before login."""
    models = scan_models(services.settings.models_dir)
    return ModelList(models=[ModelPublic(**m.public()) for m in models.values()])
