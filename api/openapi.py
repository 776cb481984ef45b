"""The OpenAPI document: error answers as problem+json, and the request limits of this server.

FastAPI's generated document is adjusted in two ways:
- every 4xx/5xx response schema is filed under `application/problem+json`, the media
  type the API sends (FastAPI would say `application/json`);
- `JobRequest` states what this server accepts right now: the names of its available
  models, the channel sets they can serve, its `count` limit and the most steps its
  models have, that a request names a model or a channel set, and what the nnunet
  format needs (nifti beside it, a channel set with seg). A client (or a
  property-based test) that keeps to the document then gets no 422 for a well-formed
  request, except when a request pairs a model with channels it lacks, or asks one
  model for more steps than it has while another model has more.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from api.problems import PROBLEM_JSON
from synthmri.channels import CHANNEL_SETS, SEG
from synthmri.contract import MAX_SEED, NNUNET, JobRequest
from synthmri.registry import Registry
from synthmri.settings import Settings


def file_errors_as_problems(schema: dict[str, Any]) -> dict[str, Any]:
    """Move every 4xx/5xx response schema to the problem+json media type."""
    for operations in schema.get("paths", {}).values():
        for operation in operations.values():
            for code, response in operation.get("responses", {}).items():
                content = response.get("content")
                if str(code)[0] in "45" and content and "application/json" in content:
                    content[PROBLEM_JSON] = content.pop("application/json")
    return schema


def describe_this_server(schema: dict[str, Any], registry: Registry, settings: Settings) -> dict[str, Any]:
    """A copy of `schema` whose JobRequest lists this server's models, channel sets and limits."""
    schema = copy.deepcopy(schema)
    request = schema["components"]["schemas"]["JobRequest"]
    props = request["properties"]
    models = registry.models.values()
    servable = [cs for cs in CHANNEL_SETS if any(set(CHANNEL_SETS[cs]) <= set(m.channels) for m in models)]
    _option(props["model"], "string", enum=sorted(registry.models))
    _option(props["channels"], "string", enum=servable)
    props["count"]["maximum"] = settings.max_count
    # FastAPI writes numeric bounds as floats, and 2**63 - 1 as a float is 2**63, one past the limit.
    _option(props["seed"], "integer", minimum=0, maximum=MAX_SEED)
    if models:
        _option(props["steps"], "integer", maximum=max(m.diffusion_steps for m in models))
    # A request names a model or a channel set (null counts as absent).
    names = [{"required": [name], "properties": {name: {"type": "string"}}} for name in ("model", "channels")]
    with_seg = [cs for cs in servable if SEG in CHANNEL_SETS[cs]]
    models_with_seg = sorted(name for name, m in registry.models.items() if SEG in m.channels)
    request["allOf"] = [{"anyOf": names}, _nnunet_needs(with_seg, models_with_seg)]
    return schema


def _nnunet_needs(channel_sets: list[str], models: list[str]) -> dict[str, Any]:
    """JobRequest's rule for the nnunet format (see `nnunet_unfit`): no nnunet, or nnunet with nifti
    and, when named, a channel set and a model with seg."""
    nnunet = {"contains": {"const": NNUNET}}

    def null_or(names: list[str]) -> dict[str, Any]:
        return {"anyOf": [{"type": "string", "enum": names}, {"type": "null"}]} if names else {"type": "null"}

    return {
        "anyOf": [
            {"properties": {"formats": {"not": nnunet}}},
            {"properties": {"formats": {"allOf": [nnunet, {"contains": {"const": "nifti"}}]},
                            "channels": null_or(channel_sets), "model": null_or(models)}},
        ]
    }  # fmt: skip


def _option(prop: dict[str, Any], type_: str, **keywords: Any) -> None:
    """Set keywords on the `type_` branch of an optional (`X | None`) property."""
    if "enum" in keywords and not keywords["enum"]:
        return
    for option in prop.get("anyOf", [prop]):
        if option.get("type") == type_:
            if "enum" in keywords:
                option.pop("maxLength", None)
                option.pop("minLength", None)
            option.update(keywords)


def install(app: FastAPI, settings: Settings, registry: Callable[[], Registry]) -> None:
    """Serve the adjusted document; `registry` returns the last scan of the models directory
    (the document is built on the event loop, which must not wait for a scan)."""
    base: dict[str, Any] = {}

    def openapi() -> dict[str, Any]:
        if not base:
            generated = get_openapi(title=app.title, version=app.version, description=app.description,
                                    routes=app.routes)  # fmt: skip
            # POST /v1/jobs reads its body itself (JSON or multipart) and names JobRequest by reference.
            schemas = generated.setdefault("components", {}).setdefault("schemas", {})
            request = JobRequest.model_json_schema(ref_template="#/components/schemas/{model}")
            schemas.setdefault("JobRequest", request)
            base.update(file_errors_as_problems(generated))
        return describe_this_server(base, registry(), settings)

    app.openapi = openapi  # type: ignore[method-assign]
