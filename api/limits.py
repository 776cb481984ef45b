"""Request size: a body over `max_request_bytes` is answered 413 problem+json.

A declared `Content-Length` over the limit is refused before anything reads the body;
a body without one (chunked) is counted as it is read, and reading stops at the limit.
(FastAPI's own `max_body_size` does the same but answers in plain text.)
"""

from __future__ import annotations

from fastapi.responses import JSONResponse
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api.problems import PROBLEM_JSON, TITLES, too_large_detail


class RejectLargeBodies:
    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        length = headers.get("content-length")
        uploads = headers.get("content-type", "").lower().startswith("multipart/")
        detail = too_large_detail(self.max_bytes, uploads)
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            body = {
                "type": "about:blank", "title": TITLES[413], "status": 413,
                "detail": detail, "instance": scope.get("path", ""),
            }  # fmt: skip
            await JSONResponse(body, status_code=413, media_type=PROBLEM_JSON)(scope, receive, send)
            return
        seen = 0

        async def counted() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    # An HTTPException from the body read reaches the app's handlers (problem+json).
                    raise HTTPException(413, detail)
            return message

        await self.app(scope, counted, send)
