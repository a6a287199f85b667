"""Errors in OpenAI's JSON shape: ``{"error": {"message", "type", "param", "code"}}``, one handler for all."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
         405: "invalid_request_error", 408: "invalid_request_error", 413: "invalid_request_error", 415: "invalid_request_error", 422: "invalid_request_error",
         429: "rate_limit_error", 500: "server_error", 503: "server_error"}


class APIError(Exception):
    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message.replace("\n", " ").strip()
        self.param = param
        self.code = code
        self.headers = headers


def error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": TYPES.get(status, "invalid_request_error"), "param": param,
                      "code": code}}


def error_response(err: APIError) -> JSONResponse:
    return JSONResponse(error_body(err.status, err.message, err.param, err.code), status_code=err.status,
                        headers=err.headers)


def install_handlers(app: FastAPI) -> None:
    async def api_error(request: Request, err: Exception) -> JSONResponse:
        assert isinstance(err, APIError)
        return error_response(err)

    async def validation_error(request: Request, err: Exception) -> JSONResponse:
        assert isinstance(err, RequestValidationError)
        return error_response(_validation(err))

    async def http_error(request: Request, err: Exception) -> JSONResponse:
        assert isinstance(err, StarletteHTTPException)
        headers = dict(getattr(err, "headers", None) or {})
        message = str(err.detail)
        if err.status_code == 404:
            message = f"no such endpoint: {request.method} {request.url.path}"
        elif err.status_code == 405:
            allowed = _allowed_methods(request)
            headers["Allow"] = ", ".join(allowed)
            message = f"{request.method} is not allowed on {request.url.path}: use {', '.join(allowed)}"
        return error_response(APIError(err.status_code, message, headers=headers or None))

    app.add_exception_handler(APIError, api_error)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(StarletteHTTPException, http_error)


def _allowed_methods(request: Request) -> list[str]:
    """Every method some route takes at this path (Starlette's 405 names only the first route's)."""
    from starlette.routing import Match

    methods: set[str] = set()
    for route in request.app.router.routes:
        match, _ = route.matches(request.scope)
        if match is not Match.NONE:
            methods.update(getattr(route, "methods", None) or ())
    return sorted(methods)


def _validation(err: RequestValidationError) -> APIError:
    """FastAPI's list of problems -> the first one, as one line naming the field."""
    problems = err.errors()
    if not problems:
        return APIError(400, "invalid request body")
    first = problems[0]
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    kind = str(first.get("type", ""))
    if kind == "json_invalid":
        return APIError(400, "the request body is not valid JSON: send a JSON object", code="invalid_json")
    if not loc and kind in ("model_attributes_type", "dict_type"):
        return APIError(400, "the request body must be a JSON object")
    param = loc[0] if loc else None
    if kind == "missing" and param is None:  # no body at all
        return APIError(400, "the request body is empty: send a JSON object", code="missing_body")
    if kind == "missing":
        return APIError(400, f"'{param}' is required", param=param, code="missing_parameter")
    message = str(first.get("msg", "invalid value"))
    return APIError(400, f"'{'.'.join(loc)}': {message}", param=param, code="invalid_value")
