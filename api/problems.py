"""RFC 9457 problem details: every 4xx/5xx of the API is `application/problem+json`.

Routes declare their error answers with `answers()`; api.openapi files them under the
problem+json media type, so clients generated from /openapi.json can decode errors.
"""

from __future__ import annotations

import logging
from typing import Any

import redis.exceptions
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

PROBLEM_JSON = "application/problem+json"
log = logging.getLogger("synthmri.api")

# Bounds on what a 422 repeats of the request, so a large or odd body cannot make a
# large answer: characters of one repeated value, and validation errors listed.
ECHO_CHARS = 60
MAX_ERRORS = 20

TITLES = {
    400: "Bad request",
    401: "Unauthorized",
    403: "Forbidden",
    404: "Not found",
    405: "Method not allowed",
    409: "Conflict",
    410: "Gone",
    413: "Request too large",
    415: "Unsupported media type",
    422: "Invalid request",
    429: "Too many requests",
    500: "Internal server error",
    503: "Service unavailable",
}


class ProblemDetails(BaseModel):
    """An error answer (RFC 9457). Some carry extra members, e.g. `errors` or `checks`."""

    model_config = ConfigDict(extra="allow")

    type: str = Field(description="A URI naming the kind of problem; `about:blank`: the status says it")
    title: str = Field(description="A short summary of the status")
    status: int = Field(description="The HTTP status code")
    detail: str = Field(description="What went wrong and what to do about it")
    instance: str = Field(description="The request path")


class ValidationErrorItem(BaseModel):
    loc: list[str | int] = Field(description="Where in the request: body, query or path, then the field")
    msg: str
    type: str


class ValidationProblem(ProblemDetails):
    errors: list[ValidationErrorItem] = Field(
        default_factory=list, description=f"The fields at fault (the first {MAX_ERRORS} problems found)"
    )


DESCRIPTIONS = {
    401: "No API key, or an unknown one",
    404: "No such job for this API key, or no such file of the job",
    409: "The job is not in a state that allows this",
    410: "The job's files have expired",
    413: "The request body is larger than the server accepts",
    415: "The request body is neither JSON nor multipart/form-data (JSON plus known channels as files)",
    422: "The request is invalid; `detail` says which field and why",
    429: "This API key has as many queued and running jobs as it may",
    503: "A service the API needs (Redis, the task queue) is unreachable; try again shortly",
}


def answers(*codes: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI `responses` for these error statuses (filed under problem+json by `install`)."""
    models = {422: ValidationProblem}
    return {
        code: {"model": models.get(code, ProblemDetails), "description": DESCRIPTIONS[code]} for code in codes
    }


def too_large_detail(limit: int, uploads: bool = False) -> str:
    """What a 413 says; with uploads (a multipart body), how to make them fit."""
    what = f"the request body is larger than this server accepts ({limit} bytes)"
    if uploads:
        return (f"{what}; send fewer files per job (one slice given to every sample, or split the job into "
                "smaller ones) or gzip the NIfTI files (.nii.gz)")  # fmt: skip
    return f"{what}; send a smaller request"


def invalid(field: str, detail: str) -> Problem:
    """A 422 about one field of the request body, listed in `errors` like a validation error."""
    loc = field if len(field) <= ECHO_CHARS else field[: ECHO_CHARS - 1] + "…"
    return Problem(422, detail, errors=[{"loc": ["body", loc], "msg": detail, "type": "value_error"}])


def clip(value: object, limit: int = ECHO_CHARS) -> str:
    """A client-supplied value as it may be repeated in an answer: repr, at most `limit` characters."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 1] + "…"


class Problem(Exception):
    """Raise from an endpoint to answer with a problem document."""

    def __init__(
        self,
        status: int,
        detail: str,
        *,
        title: str | None = None,
        type_: str = "about:blank",
        headers: dict[str, str] | None = None,
        **extensions: Any,
    ) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail
        self.title = title or TITLES.get(status, "Error")
        self.type = type_
        self.headers = headers or {}
        self.extensions = extensions


def problem_response(
    request: Request,
    status: int,
    detail: str,
    *,
    title: str | None = None,
    type_: str = "about:blank",
    headers: dict[str, str] | None = None,
    **extensions: Any,
) -> JSONResponse:
    body = {
        "type": type_,
        "title": title or TITLES.get(status, "Error"),
        "status": status,
        "detail": detail,
        "instance": request.url.path,
        **extensions,
    }
    return JSONResponse(body, status_code=status, media_type=PROBLEM_JSON, headers=headers)


def _location(loc: tuple[Any, ...] | list[Any]) -> str:
    parts = [_clip_part(p) for p in loc if p not in ("body",)]
    return ".".join(str(p) for p in parts) if parts else "body"


def _clip_part(part: object) -> str | int:
    """One element of an error location (a field name may come from the client)."""
    if isinstance(part, int):
        return part
    text = str(part)
    return text if len(text) <= ECHO_CHARS else text[: ECHO_CHARS - 1] + "…"


def _clip_message(msg: str) -> str:
    return msg if len(msg) <= 4 * ECHO_CHARS else msg[: 4 * ECHO_CHARS - 1] + "…"


def describe_validation_errors(errors: list[dict[str, Any]]) -> str:
    """Pydantic errors as one line a person can act on: `count: must be ≥ 1; ...`."""
    lines = []
    for e in errors[:MAX_ERRORS]:
        msg = _clip_message(str(e.get("msg", "invalid")))
        msg = msg.removeprefix("Value error, ")
        where = _location(e.get("loc", ()))
        if e.get("type") == "json_invalid":
            lines.append(f"the body is not valid JSON ({e.get('ctx', {}).get('error', msg)})")
        elif e.get("type") == "missing" and where == "body":
            lines.append("the request needs a JSON body")
        elif e.get("type") == "extra_forbidden":
            lines.append(f"{where}: unknown field (remove it)")
        else:
            lines.append(f"{where}: {msg}")
    if len(errors) > MAX_ERRORS:
        lines.append(f"and {len(errors) - MAX_ERRORS} more")
    return "; ".join(lines) or "the request is invalid"


def allowed_methods(request: Request) -> list[str]:
    """Every method some route serves at this path (Starlette's own 405 names only one route's)."""
    methods: set[str] = set()
    for route in request.app.router.routes:
        match, _ = route.matches(request.scope)
        if match != Match.NONE and getattr(route, "methods", None):
            methods |= set(route.methods)
    return sorted(methods)


def install(app: FastAPI) -> None:
    """Route FastAPI's own errors (404, 405, validation, crashes) through problem+json."""

    @app.exception_handler(Problem)
    async def _problem(request: Request, exc: Problem) -> JSONResponse:
        return problem_response(
            request, exc.status, exc.detail, title=exc.title, type_=exc.type, headers=exc.headers,
            **exc.extensions,
        )  # fmt: skip

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        detail = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
        headers = dict(getattr(exc, "headers", None) or {})
        status = exc.status_code
        if status == 404 and detail == "Not Found":
            detail = f"there is no resource at {request.url.path}; see /docs for the API"
        elif status == 405:
            allowed = allowed_methods(request)
            headers["Allow"] = ", ".join(allowed)
            detail = f"{request.method} is not allowed on {request.url.path}; use {' or '.join(allowed)}"
        elif status == 400 and isinstance(exc.__cause__, ValueError):
            # FastAPI's answer to a body it cannot decode (e.g. not UTF-8): invalid JSON, like any other.
            status, detail = 422, "the body is not valid JSON (send UTF-8 encoded JSON)"
        return problem_response(request, status, detail, headers=headers)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        found = list(exc.errors())
        errors = [
            {
                "loc": [_clip_part(p) for p in e.get("loc", ())],
                "msg": _clip_message(str(e.get("msg", ""))),
                "type": str(e.get("type", "")),
            }
            for e in found[:MAX_ERRORS]
        ]
        return problem_response(request, 422, describe_validation_errors(found), errors=errors)

    @app.exception_handler(redis.exceptions.RedisError)
    async def _redis(request: Request, exc: redis.exceptions.RedisError) -> JSONResponse:
        log.warning("Redis error on %s %s: %s", request.method, request.url.path, type(exc).__name__)
        return problem_response(
            request, 503, f"the job store (Redis) is unreachable ({type(exc).__name__}); try again shortly",
            headers={"Retry-After": "5"},
        )  # fmt: skip

    @app.exception_handler(Exception)
    async def _crash(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return problem_response(
            request, 500, f"internal error ({type(exc).__name__}); the server log has details"
        )
