"""OpenAI's error envelope and the mapping from every failure to it.

`{"error": {"message", "type", "param", "code"}}`. Messages describe the problem and name the
field, never echo the request body back (it may be large or hold secrets).
"""

from __future__ import annotations

import logging
import re
from http import HTTPStatus

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from llmserve.engine.async_engine import EngineDeadError, QueueFullError

logger = logging.getLogger(__name__)

_TYPES = {
    400: "invalid_request_error",
    401: "invalid_request_error",
    403: "invalid_request_error",
    404: "invalid_request_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
}


_TYPE_TAG = re.compile(r"^(str|int|float|bool|none|dict|list)$|[\[\]()-]|^[A-Z]")


class APIError(Exception):
    """An error with an HTTP status that becomes OpenAI's envelope."""

    def __init__(self, status: int, message: str, *, param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.headers = headers or {}


def error_body(status: int, message: str, param: str | None = None,
               code: str | None = None) -> dict:
    """The envelope as a dict (also used for SSE error events)."""
    err_type = _TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    return {"error": {"message": message, "type": err_type, "param": param, "code": code}}


def error_response(status: int, message: str, param: str | None = None,
                   code: str | None = None, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(error_body(status, message, param, code), status_code=status,
                        headers=headers)


def model_not_found(name: str) -> APIError:
    shown = name if len(name) <= 64 else name[:64] + "..."
    return APIError(404, f"The model '{shown}' does not exist", param="model",
                    code="model_not_found")


def validation_message(exc: RequestValidationError | ValidationError) -> tuple[str, str | None]:
    """(message, param) of a body that failed validation: the first error, naming its field."""
    errors = exc.errors()
    if not errors:
        return "invalid request body", None
    first = errors[0]
    if first.get("type") in ("json_invalid", "json_type"):
        return "request body is not valid JSON", None
    # Union members add their type ("str", "list[int]", "TextPart") to the location; keep only
    # field names and list indexes.
    loc = [str(p) for p in first.get("loc", ()) if p != "body" and not _TYPE_TAG.match(str(p))]
    param = ".".join(loc) or None
    msg = str(first.get("msg", "invalid value")).removeprefix("Value error, ")
    if first.get("type") == "missing":
        msg = "field required"
    elif not loc and first.get("type") in ("model_attributes_type", "dict_type"):
        msg = "request body must be a JSON object (Content-Type: application/json)"
    text = f"{param}: {msg}" if param else msg
    return text[:500], param


async def _on_validation(request: Request, exc: RequestValidationError) -> JSONResponse:
    message, param = validation_message(exc)
    return error_response(400, message, param=param)


async def _on_api_error(request: Request, exc: APIError) -> JSONResponse:
    return error_response(exc.status, exc.message, exc.param, exc.code, exc.headers)


async def _on_http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    try:
        phrase = HTTPStatus(exc.status_code).phrase
    except ValueError:
        phrase = "error"
    message = exc.detail if isinstance(exc.detail, str) else phrase
    return error_response(exc.status_code, message, headers=getattr(exc, "headers", None))


async def _on_value_error(request: Request, exc: ValueError) -> JSONResponse:
    return error_response(400, str(exc)[:1000])


async def _on_queue_full(request: Request, exc: QueueFullError) -> JSONResponse:
    retry = str(max(1, round(exc.retry_after)))
    return error_response(429, str(exc), code="server_overloaded", headers={"Retry-After": retry})


async def _on_engine_dead(request: Request, exc: EngineDeadError) -> JSONResponse:
    return error_response(503, f"the engine is not available: {exc}", code="engine_unavailable")


async def _on_unexpected(request: Request, exc: Exception) -> JSONResponse:
    logger.exception("unhandled error serving %s", request.url.path)
    return error_response(500, "internal server error")


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(RequestValidationError, _on_validation)
    app.add_exception_handler(APIError, _on_api_error)
    app.add_exception_handler(StarletteHTTPException, _on_http)
    app.add_exception_handler(ValueError, _on_value_error)
    app.add_exception_handler(QueueFullError, _on_queue_full)
    app.add_exception_handler(EngineDeadError, _on_engine_dead)
    app.add_exception_handler(Exception, _on_unexpected)
