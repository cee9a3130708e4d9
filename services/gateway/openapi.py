"""The gateway's OpenAPI document: every error is an RFC 9457 problem body, documented as the
``Problem`` schema on each route for the statuses that route can answer; scopes come from the
OAuth2 security scheme (see ``security.require``)."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel, ConfigDict, Field

from shared.contracts.filters import FILTER_SCHEMAS
from shared.problems import PROBLEM_CONTENT_TYPE

_PROBLEM_REF = {"$ref": "#/components/schemas/Problem"}

_DESCRIPTIONS = {
    400: "Malformed request: a body that does not parse (`bad_request`); OAuth2 token errors "
    "(`invalid_request`, `invalid_scope`, …)",
    401: "No token (`missing_token`), a bad one (`invalid_token`), an expired one "
    "(`token_expired`) or a revoked one (`token_revoked`)",
    403: "The token lacks the route's scope (`insufficient_scope`, `required_scopes`)",
    404: "Not found (`item_not_found`, `collection_not_found`, `principal_not_found`)",
    409: "Conflict (`duplicate_item` and `duplicate_pending` with `item_id`, `item_not_indexed`, "
    "`item_limit`, `model_mismatch`, `principal_exists`, `key_rotation_failed`)",
    413: "Too large (`payload_too_large`, `image_too_large`)",
    415: "Upload media type not accepted (`unsupported_media_type`)",
    422: "Invalid input (`validation_error` with `errors`, `invalid_image`, `invalid_filter`, …)",
    429: "Rate limited (`rate_limited`); `Retry-After` says when to retry",
    503: "A dependency is down, slow or suspended by its circuit breaker "
    "(`<service>_unavailable`, `<service>_timeout`, `<service>_error`, "
    "`rate_limiter_unavailable`, `revocations_unavailable`); `Retry-After` is set",
}


class ValidationIssue(BaseModel):
    loc: list[str]
    msg: str
    type: str


class Problem(BaseModel):
    """RFC 9457 problem details; ``code`` is the stable, machine-readable part."""

    model_config = ConfigDict(extra="allow")

    type: str = Field(examples=["https://crossmodal.dev/problems/rate_limited"])
    title: str = Field(examples=["Too Many Requests"])
    status: int = Field(examples=[429])
    detail: str
    code: str = Field(examples=["rate_limited"])
    instance: str | None = Field(None, examples=["/search/text"])
    errors: list[ValidationIssue] | None = Field(None, description="With validation_error.")
    required_scopes: list[str] | None = Field(None, description="With insufficient_scope.")
    request_id: str | None = Field(
        None, description="With a 5xx: the request's id, to quote when reporting the failure."
    )


def problems(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """``responses=`` entries for the given error statuses, each a Problem body."""
    return {
        status: {
            "description": _DESCRIPTIONS.get(status, "Error"),
            "content": {PROBLEM_CONTENT_TYPE: {"schema": _PROBLEM_REF}},
        }
        for status in statuses
    }


# What any route with a scope can answer, besides its own errors.
SECURED = (401, 403, 422, 429, 503)
# What any route with a request body can answer: a body that does not parse (400) and one over
# the size limits (413), refused before the route runs.
WITH_BODY = (400, 413)


def links(parameter: str, pointer: str, *operations: tuple[str, str]) -> dict[str, Any]:
    """OpenAPI links from a created resource to the operations (method, path) that take it:
    ``parameter`` of each is ``pointer`` in the answer's body."""
    return {
        f"{method.lower()}{path.replace('/', '_').replace('{', '').replace('}', '')}": {
            "operationRef": "#/paths/" + path.replace("~", "~0").replace("/", "~1") + f"/{method}",
            "parameters": {parameter: f"$response.body#{pointer}"},
        }
        for method, path in operations
    }


def install_openapi(app: FastAPI, components: dict[str, dict[str, Any]] | None = None) -> None:
    """Generate the document once, with the Problem schema among the components, and the
    ``components`` given (request bodies a route reads itself and names in its
    ``openapi_extra``)."""

    extra_components = dict(components or {})

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(
                title=app.title,
                version=app.version,
                description=app.description,
                routes=app.routes,
            )
            components = schema.setdefault("components", {}).setdefault("schemas", {})
            problem = Problem.model_json_schema(ref_template="#/components/schemas/{model}")
            components.update(problem.pop("$defs", {}))
            components["Problem"] = problem
            components.update(extra_components)
            # The filter language and attributes, which fields refer to (component_schema).
            components.update(FILTER_SCHEMAS)
            # FastAPI's own validation-error schemas are never answered: problems replace them.
            for name in ("HTTPValidationError", "ValidationError"):
                components.pop(name, None)
            for item in schema.get("paths", {}).values():
                for operation in item.values():
                    if "requestBody" in operation:
                        responses = operation.setdefault("responses", {})
                        for status, response in problems(*WITH_BODY).items():
                            responses.setdefault(str(status), response)
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
