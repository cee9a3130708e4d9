"""One error hierarchy and one handler: every 4xx/5xx is an RFC 9457 problem body.

Body: {"type", "title", "status", "detail", "code", "instance", ...extra}, and ``request_id`` on a
5xx. ``code`` is the stable, machine-readable part; ``detail`` is for humans and may change.
"""

from __future__ import annotations

import logging
from http import HTTPStatus
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import compile_path

from shared.context import request_id_var

PROBLEM_CONTENT_TYPE = "application/problem+json"
PROBLEM_TYPE_BASE = "https://crossmodal.dev/problems/"

log = logging.getLogger(__name__)


class ProblemError(Exception):
    """Raise anywhere in a request to answer with a problem body."""

    status: int = 500
    code: str = "internal_error"

    def __init__(
        self,
        detail: str,
        *,
        code: str | None = None,
        status: int | None = None,
        headers: dict[str, str] | None = None,
        extra: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(detail)
        self.detail = detail
        if code is not None:
            self.code = code
        if status is not None:
            self.status = status
        self.headers = headers or {}
        self.extra = extra or {}


class BadRequest(ProblemError):
    status, code = 400, "bad_request"


class Unauthorized(ProblemError):
    status, code = 401, "unauthorized"

    def __init__(self, detail: str, **kwargs: Any) -> None:
        kwargs.setdefault("headers", {"WWW-Authenticate": 'Bearer realm="crossmodal"'})
        super().__init__(detail, **kwargs)


class Forbidden(ProblemError):
    status, code = 403, "forbidden"


class NotFound(ProblemError):
    status, code = 404, "not_found"


class Conflict(ProblemError):
    status, code = 409, "conflict"


class PayloadTooLarge(ProblemError):
    status, code = 413, "payload_too_large"


class UnsupportedMediaType(ProblemError):
    status, code = 415, "unsupported_media_type"


class Unprocessable(ProblemError):
    status, code = 422, "validation_error"


class TooManyRequests(ProblemError):
    status, code = 429, "rate_limited"


class BadGateway(ProblemError):
    status, code = 502, "bad_gateway"


class ServiceUnavailable(ProblemError):
    status, code = 503, "service_unavailable"


class GatewayTimeout(ProblemError):
    status, code = 504, "upstream_timeout"


def problem_response(
    request: Request | None,
    status: int,
    code: str,
    detail: str,
    *,
    headers: dict[str, str] | None = None,
    extra: dict[str, Any] | None = None,
) -> JSONResponse:
    try:
        title = HTTPStatus(status).phrase
    except ValueError:
        title = "Error"
    body: dict[str, Any] = {
        "type": PROBLEM_TYPE_BASE + code,
        "title": title,
        "status": status,
        "detail": detail,
        "code": code,
    }
    if request is not None:
        body["instance"] = request.url.path
    if status >= 500 and (request_id := request_id_var.get()):
        # The id to quote when reporting a failure: it finds the failure's log lines.
        body["request_id"] = request_id
    if extra:
        body.update({k: v for k, v in extra.items() if k not in body})
    return JSONResponse(body, status_code=status, headers=headers, media_type=PROBLEM_CONTENT_TYPE)


_CODES_BY_STATUS = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    406: "not_acceptable",
    409: "conflict",
    413: "payload_too_large",
    415: "unsupported_media_type",
    422: "validation_error",
    429: "rate_limited",
}


def _validation_errors(exc: RequestValidationError) -> list[dict[str, Any]]:
    # Only location, message and type: echoing the input back could leak secrets or huge payloads.
    return [
        {
            "loc": [str(p) for p in err.get("loc", ())],
            "msg": err.get("msg", ""),
            "type": err.get("type", ""),
        }
        for err in exc.errors()
    ]


_HTTP_METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "TRACE")


def allowed_methods(app: FastAPI, path: str, routed: str = "") -> str:
    """The ``Allow`` header of a 405 on ``path``: every method of every documented operation
    whose path template matches, with ``routed`` (the router's own ``Allow``, which names only
    the first route it matched). FastAPI declares one route per method, so the router alone
    would answer ``Allow: GET`` for a path that also takes DELETE."""
    methods = {m.strip().upper() for m in routed.split(",") if m.strip()}
    for template, item in app.openapi().get("paths", {}).items():
        regex, _, _ = compile_path(template)
        if regex.match(path):
            methods.update(m.upper() for m in item if m.upper() in _HTTP_METHODS)
    return ", ".join(m for m in _HTTP_METHODS if m in methods)


def install_problem_handlers(app: FastAPI) -> None:
    @app.exception_handler(ProblemError)
    async def _problem(request: Request, exc: ProblemError) -> JSONResponse:
        if exc.status >= 500:
            log.warning("problem %s %s: %s", exc.status, exc.code, exc.detail)
        return problem_response(
            request, exc.status, exc.code, exc.detail, headers=exc.headers, extra=exc.extra
        )

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = _validation_errors(exc)
        first = errors[0] if errors else {"loc": [], "msg": "invalid request"}
        where = ".".join(p for p in first["loc"] if p not in ("body", "query", "path"))
        detail = f"{where}: {first['msg']}" if where else first["msg"]
        return problem_response(request, 422, "validation_error", detail, extra={"errors": errors})

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = _CODES_BY_STATUS.get(exc.status_code, "http_error")
        headers = dict(getattr(exc, "headers", None) or {})
        if exc.status_code == 405:
            headers["Allow"] = allowed_methods(
                request.app, request.url.path, headers.pop("Allow", "")
            )
        return problem_response(
            request, exc.status_code, code, str(exc.detail), headers=headers or None
        )

    @app.exception_handler(Exception)
    async def _unhandled(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return problem_response(request, 500, "internal_error", "internal server error")
