"""What the HTTP server checks before a route runs: API keys, body size limits, and readable messages
for request validation errors."""
from __future__ import annotations

import secrets
from typing import Sequence

from fastapi import HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse


def _presented_key(request: Request) -> str | None:
    key = request.headers.get("x-api-key")
    if key:
        return key
    auth = request.headers.get("authorization", "")
    if auth.lower().startswith("bearer "):
        return auth[7:].strip() or None
    return None


def _check_key(request: Request, what: str) -> None:
    expected = request.app.state.api_key
    if expected is None:
        raise HTTPException(403, f"{what} disabled: no API key configured (set ServeConfig.api_key or ACE_API_KEY)")
    presented = _presented_key(request)
    if presented is None:
        raise HTTPException(401, f"{what} require an API key (header 'X-API-Key: KEY' or 'Authorization: Bearer KEY')",
                            headers={"WWW-Authenticate": "Bearer"})
    if not secrets.compare_digest(presented.encode(), expected.encode()):
        raise HTTPException(401, "invalid API key", headers={"WWW-Authenticate": "Bearer"})


def require_write_key(request: Request) -> None:
    """Dependency for write endpoints (POST /items, DELETE /items/{id}): always keyed."""
    _check_key(request, "write endpoints are")


def require_read_key(request: Request) -> None:
    """Dependency for read endpoints: keyed only when ``read_requires_key``."""
    if request.app.state.config.read_requires_key:
        _check_key(request, "read endpoints")

class BodyLimitMiddleware:
    """Refuses request bodies above a limit with 413: by Content-Length up front, else while streaming."""

    def __init__(self, app, *, max_body_bytes: int, max_upload_bytes: int, upload_paths: Sequence[str] = ("/items",)):
        self.app = app
        self.max_body, self.max_upload, self.upload_paths = max_body_bytes, max_upload_bytes, tuple(upload_paths)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        is_upload = scope["method"] == "POST" and scope["path"].rstrip("/") in self.upload_paths
        limit = self.max_upload if is_upload else self.max_body
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None:
            try:
                too_big = int(length) > limit
            except ValueError:
                return await _send_json(send, 400, "invalid Content-Length header")
            if too_big:
                return await _send_json(send, 413, f"request body of {int(length)} bytes exceeds the limit of {limit} bytes")
        seen = 0

        async def limited_receive():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise HTTPException(413, f"request body exceeds the limit of {limit} bytes")
            return message

        return await self.app(scope, limited_receive, send)


async def _send_json(send, status: int, detail: str) -> None:
    body = JSONResponse({"detail": detail}, status_code=status).body
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


def validation_message(exc: RequestValidationError) -> tuple[int, str, list[dict]]:
    errors = []
    for err in exc.errors():
        loc = [str(x) for x in err.get("loc", ()) if x != "body"]
        errors.append({"field": ".".join(loc) or "body", "message": str(err.get("msg", "invalid"))})
    kinds = {e.get("type") for e in exc.errors()}
    if "json_invalid" in kinds:
        err = next(e for e in exc.errors() if e.get("type") == "json_invalid")
        reason = (err.get("ctx") or {}).get("error", "invalid JSON")
        return 400, f"malformed JSON body: {reason}", errors
    if any(e.get("type") == "missing" and tuple(e.get("loc", ())) == ("body",) for e in exc.errors()):
        return 422, 'request body is required: a JSON object like {"query": "a dog on a beach"}', errors
    if any(e.get("type") in ("model_attributes_type", "dict_type") and tuple(e.get("loc", ())) == ("body",)
           for e in exc.errors()):
        return 422, 'request body must be a JSON object (Content-Type: application/json) like {"query": "..."}', errors
    return 422, "; ".join(f"{e['field']}: {e['message']}" for e in errors), errors
