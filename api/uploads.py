"""The body of POST /v1/jobs: JSON, or multipart/form-data with known channels as files.

A multipart body carries the same `JobRequest` JSON in a form field `request`, and files in
fields named after model channels (`t1`, `t1ce`, `t2`, `flair`, `seg`); synthmri.given judges
the files. Both forms go through the same validation and answer the same problem+json, so
a client can move from one to the other by adding files.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException

from api.problems import Problem, clip, invalid
from synthmri.channels import MODALITIES, SEG
from synthmri.contract import JobRequest
from synthmri.given import Upload

MULTIPART = "multipart/form-data"
REQUEST_FIELD = "request"
CHANNEL_FIELDS: tuple[str, ...] = (*MODALITIES, SEG)

# How the request body is documented in the OpenAPI document (JobRequest is filled in by api.openapi).
# A schema cannot say which bytes make a usable NIfTI or PNG, so the files are described in words, and
# the request it does describe has no files: there `guidance`, which only goes with files, stays null.
_WITHOUT_FILES: dict[str, Any] = {
    "allOf": [
        {"$ref": "#/components/schemas/JobRequest"},
        {"properties": {"guidance": {"type": "null", "description": "only with known-channel files"}}},
    ]
}
REQUEST_BODY: dict[str, Any] = {
    "required": True,
    "content": {
        "application/json": {"schema": _WITHOUT_FILES},
        MULTIPART: {
            "schema": {
                "type": "object",
                "required": [REQUEST_FIELD],
                "properties": {REQUEST_FIELD: _WITHOUT_FILES},
                "additionalProperties": False,
                "description": "The JobRequest JSON in the field `request`, plus known channels as file "
                "parts named after model channels (t1, t1ce, t2, flair, seg): per channel one file (given "
                "to every sample), `count` files (one per sample, in order) or one NIfTI volume with "
                "`count` slices along its last axis; NIfTI (.nii, .nii.gz) or 8/16-bit grayscale PNG. "
                "With files, `guidance` may be a number. See docs/conditioning.md.",
            },
            "encoding": {REQUEST_FIELD: {"contentType": "application/json"}},
        },
    },
}


@dataclass
class Submission:
    request: JobRequest
    uploads: list[Upload] = field(default_factory=list)


def media_type(request: Request) -> str:
    return request.headers.get("content-type", "").split(";")[0].strip().lower()


def _is_json(media: str) -> bool:
    return media == "application/json" or (media.startswith("application/") and media.endswith("+json"))


async def read_submission(request: Request, max_count: int) -> Submission:
    """The job request and its uploads (at most one file per channel and sample of the largest
    job); 415 for another media type, 422 for a bad body."""
    media = media_type(request)
    headers = request.headers
    empty = headers.get("content-length", "0") == "0" and "transfer-encoding" not in headers
    if _is_json(media) or (not media and empty):
        return Submission(parse_job_request(await request.body()))
    if media == MULTIPART:
        return await _read_multipart(request, len(CHANNEL_FIELDS) * max_count)
    shown = media[:60] or "no Content-Type"
    raise Problem(415, "the body must be JSON sent with `Content-Type: application/json`, or "
                  f"{MULTIPART} with that JSON in a `{REQUEST_FIELD}` field and known channels as files "
                  f"(got {shown})")  # fmt: skip


def parse_job_request(body: bytes) -> JobRequest:
    """A JobRequest from JSON bytes, with FastAPI's own validation errors (so the 422 reads the same)."""
    if not body:
        raise RequestValidationError([{"type": "missing", "loc": ("body",), "msg": "Field required"}])
    try:
        value = json.loads(body)
    except json.JSONDecodeError as e:
        error = {"type": "json_invalid", "loc": ("body", e.pos), "msg": "JSON decode error",
                 "ctx": {"error": e.msg}}  # fmt: skip
        raise RequestValidationError([error]) from None
    except UnicodeDecodeError:
        raise Problem(422, "the body is not valid JSON (send UTF-8 encoded JSON)") from None
    try:
        return JobRequest.model_validate(value)
    except ValidationError as e:
        raise RequestValidationError([{**err, "loc": ("body", *err["loc"])} for err in e.errors()]) from None


async def _read_multipart(request: Request, max_files: int) -> Submission:
    try:
        form = await request.form(max_files=max_files + 1, max_fields=8)
    except HTTPException as e:
        if e.status_code != 400:  # 413 from the body limit goes on as it is
            raise
        detail = (f"the multipart body cannot be read ({e.detail}); send {MULTIPART} with the job JSON in a "
                  f"`{REQUEST_FIELD}` field and at most {max_files} files")  # fmt: skip
        raise Problem(422, detail) from None
    try:
        body: bytes | None = None
        uploads: list[Upload] = []
        for name, value in form.multi_items():
            if name == REQUEST_FIELD:
                if body is not None:
                    raise invalid(name, f"send one `{REQUEST_FIELD}` field")
                body = await value.read() if isinstance(value, UploadFile) else value.encode()
            elif name not in CHANNEL_FIELDS:
                raise invalid(name, f"unknown form field {clip(name)}; send `{REQUEST_FIELD}` (the job JSON) "
                              f"and files named after channels ({', '.join(CHANNEL_FIELDS)})")  # fmt: skip
            elif not isinstance(value, UploadFile):
                raise invalid(name, f"{name} must be a file part (e.g. curl -F '{name}=@{name}.nii.gz')")
            else:
                uploads.append(Upload(name, value.filename or "", await value.read()))
    finally:
        await form.close()
    if body is None:
        example = f"curl -F '{REQUEST_FIELD}={{\"channels\": \"t1ce+seg\", \"count\": 4}}'"
        raise invalid(REQUEST_FIELD, f"a {MULTIPART} body needs the job JSON in a `{REQUEST_FIELD}` field "
                      f"(e.g. {example})")
    return Submission(parse_job_request(body), uploads)
