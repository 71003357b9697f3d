"""The API's own error types, the JSON error body, and the handlers that turn every
exception into `{"error": <type>, "detail": <message>}` with the right status."""

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..errors import LookalikeError

log = logging.getLogger("lookalike.api")


class NotReadyError(LookalikeError):
    """The engine is still loading (or failed to load); retry later."""

    http_status = 503


class AuthError(LookalikeError):
    """Missing or wrong API key."""

    http_status = 401


class WritesDisabledError(LookalikeError):
    """No API key is configured, so catalog writes are refused."""

    http_status = 403


def error_body(error: str, detail: str, **extra: Any) -> dict[str, Any]:
    return {"error": error, "detail": detail, **extra}


_STATUS_NAMES = {
    400: "BadRequest",
    401: "AuthError",
    403: "Forbidden",
    404: "NotFound",
    408: "RequestTimeout",
    405: "MethodNotAllowed",
    406: "NotAcceptable",
    409: "Conflict",
    413: "RequestTooLarge",
    415: "UnsupportedMediaType",
    422: "ValidationError",
    429: "TooManyRequests",
}


async def lookalike_error(request: Request, exc: LookalikeError) -> JSONResponse:
    status = int(getattr(exc, "http_status", 400))
    if status >= 500 and not isinstance(exc, NotReadyError):
        log.error("%s on %s %s: %s", type(exc).__name__, request.method, request.url.path, exc)
    headers: dict[str, str] = {}
    if isinstance(exc, AuthError):
        headers["WWW-Authenticate"] = "Bearer"
    if isinstance(exc, NotReadyError):
        headers["Retry-After"] = "2"
    return JSONResponse(error_body(type(exc).__name__, str(exc)), status, headers=headers)


async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    problems = []
    for err in exc.errors():
        loc = [str(part) for part in err.get("loc", ()) if part not in ("body", "query", "path")]
        problems.append({"field": ".".join(loc) or None, "message": str(err.get("msg", ""))})
    detail = "; ".join(
        f"{p['field']}: {p['message']}" if p["field"] else p["message"] for p in problems
    )
    return JSONResponse(
        error_body("ValidationError", detail or "invalid request", errors=problems), 422
    )


async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    detail = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
    if exc.status_code == 404 and detail == "Not Found":
        detail = f"no such endpoint: {request.method} {request.url.path} (see /docs)"
    name = _STATUS_NAMES.get(exc.status_code, "HTTPError")
    return JSONResponse(
        error_body(name, detail), exc.status_code, headers=getattr(exc, "headers", None)
    )


async def internal_error(request: Request, exc: Exception) -> JSONResponse:
    log.exception("unhandled error on %s %s", request.method, request.url.path)
    return JSONResponse(
        error_body("InternalError", "internal server error; the server log has details"), 500
    )


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(LookalikeError, lookalike_error)  # type: ignore[arg-type]
    app.add_exception_handler(RequestValidationError, validation_error)  # type: ignore[arg-type]
    app.add_exception_handler(StarletteHTTPException, http_error)  # type: ignore[arg-type]
    app.add_exception_handler(Exception, internal_error)
