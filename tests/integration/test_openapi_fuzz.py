"""The gateway's OpenAPI document is true to its behaviour: schemathesis (every check, the
examples, coverage, fuzzing and stateful phases) against a stack of its own.

- The stack is this module's: five processes, the untrained tiny CLIP, rate limits raised out of
  the way and a generous search budget (a 429 or a budget 503 would only hide the route behind).
  Everything in it is throwaway, so destructive operations (DELETE /collections/{c}, DELETE
  /items/{id}, PATCH /admin/principals/{name}, key rotation, revocations) are fuzzed like the rest:
  on collections, items and principals the fuzzer itself created, or on the seeded "demo".
- Requests carry the token of a throwaway admin client created for the run (client_credentials,
  fetched once: fuzzing /auth/token cannot lock it out). Steps aimed at that client by name go to
  a decoy principal instead, so that no step can revoke, disable or re-key the fuzzer's own access.
- Bounded and deterministic: a fixed seed and derandomized generation (and none of Hypothesis'
  constants taken from whichever project modules are imported), MAX_EXAMPLES cases per
  operation and phase, SCENARIOS stateful scenarios of at most STEPS steps; the same cases on
  every run and machine, about a minute on two cores.
- Where schemathesis is wrong about the document, and only there, the test says why and adjusts:
  OAuth2 answers wrong credentials with 400 (RFC 6749 §5.2); a body over the byte limit gets the
  documented 413, which JSON Schema cannot foresee; "negative" cases that are valid after all
  (anyOf) are checked as the positive cases they are; an image part is a real image in a positive
  case.
"""

from __future__ import annotations

import functools
import io
import itertools
import json
import re
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import hypothesis
import jsonschema_rs
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase
from hypothesis import strategies as st
from hypothesis.errors import FlakyStrategyDefinition
from hypothesis.internal.conjecture import providers as hypothesis_providers
from PIL import Image
from schemathesis.core.failures import FailureGroup
from schemathesis.core.parameters import ParameterLocation

from crossmodal.stack import LocalStack
from services.gateway.app import create_app
from services.gateway.settings import DEFAULT_UPLOAD_TYPES
from shared.collections import COLLECTION_NAME_PATTERN
from shared.contracts.auth import NAME_PATTERN
from tests.integration.support import (
    ALL_SCOPES,
    add_item,
    gateway_client,
    get_token,
    png_bytes,
    running_stack,
)

SEED = 20261205
MAX_EXAMPLES = 25
SCENARIOS = 25
STEPS = 8
NAME = re.compile(NAME_PATTERN)
COLLECTION = re.compile(COLLECTION_NAME_PATTERN)

_GENEROUS = '{"rate": 100000, "burst": 100000}'
FUZZ_ENV = {
    "GATEWAY_RATE_LIMITS": "{"
    + ", ".join(f'"{scope}": {_GENEROUS}' for scope in ALL_SCOPES.split())
    + "}",
    "GATEWAY_IP_RATE_LIMIT": _GENEROUS,
    "GATEWAY_TOKEN_RATE_LIMIT": _GENEROUS,
    "GATEWAY_SEARCH_TIMEOUT_SECONDS": "60",
}


@pytest.fixture(scope="module")
def fuzz_stack(
    random_model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LocalStack]:
    with running_stack(
        tmp_path_factory.mktemp("fuzz-stack"), random_model_dir, extra_env=FUZZ_ENV
    ) as stack:
        yield stack


@pytest.fixture(scope="module")
def gateway_url(fuzz_stack: LocalStack) -> str:
    """The stack, its throwaway principal and decoy, and one item in "demo" (the collection
    searches default to), ready for the fuzzer."""
    url = fuzz_stack.url("gateway")
    with gateway_client(fuzz_stack) as gateway:
        served = gateway.get("/openapi.json").json()
        assert served == schema.raw_schema, "the stack serves another document than the test's"
        admin = {"Authorization": f"Bearer {get_token(gateway)}"}
        suffix = uuid.uuid4().hex[:12]
        secret = _create_principal(gateway, admin, f"fuzz-{suffix}")
        _create_principal(gateway, admin, f"decoy-{suffix}")
        answer = gateway.post(
            "/auth/token",
            data={
                "grant_type": "client_credentials",
                "client_id": f"fuzz-{suffix}",
                "client_secret": secret,
                "scope": ALL_SCOPES,
            },
        )
        assert answer.status_code == 200, answer.text
        image = png_bytes(Image.new("RGB", (8, 8), "red"))
        add_item(gateway, admin, image, collection="demo", captions=["a red square"])
    _TARGET.update(
        token=answer.json()["access_token"],
        principal=f"fuzz-{suffix}",
        decoy=f"decoy-{suffix}",
    )
    return url


def _create_principal(gateway: httpx.Client, admin: dict[str, str], name: str) -> str:
    created = gateway.post(
        "/admin/principals",
        headers=admin,
        json={"name": name, "kind": "client", "scopes": ALL_SCOPES.split()},
    )
    assert created.status_code == 201, created.text
    return str(created.json()["secret"])


# schemathesis' default lists of answers that accept valid data and refuse invalid data, plus
# 413: a body over the byte limits is refused with the documented 413 before it is parsed, and
# JSON Schema cannot say how many bytes a value takes.
ACCEPTED = ["2xx", "3xx", "401", "403", "404", "409", "413", "429", "5xx"]
REFUSED = [*map(str, (400, 401, 403, 404, 405, 406, 409, 413, 415, 422, 428, 429)), "5xx"]
CONFIG = schemathesis.Config.from_dict(
    {
        "seed": SEED,
        "generation": {"max-examples": MAX_EXAMPLES, "deterministic": True, "database": "none"},
        "suppress-health-check": ["all"],
        "checks": {
            "negative_data_rejection": {"expected-statuses": REFUSED},
            "positive_data_acceptance": {"expected-statuses": ACCEPTED},
        },
        "operations": [
            {
                # RFC 6749 §5.2: a well-formed token request with unknown credentials or a scope
                # not granted is answered 400 (invalid_grant, invalid_scope), not 401 or 403.
                "include-path-regex": "^/auth/",
                "checks": {"positive_data_acceptance": {"expected-statuses": [*ACCEPTED, "400"]}},
            }
        ],
    }
)


def _encode(size: tuple[int, int], colour: tuple[int, int, int], image_format: str) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, format=image_format)
    return buffer.getvalue()


def _format(media_type: str) -> str:
    return media_type.split("/")[1].upper()


def _is_image(data: object) -> bool:
    if not isinstance(data, bytes):
        return False
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.verify()
    except Exception:
        return False
    return True


def _image_bytes(image_format: str) -> st.SearchStrategy[bytes]:
    sizes = st.tuples(st.integers(1, 32), st.integers(1, 32))
    colours = st.tuples(*(st.integers(0, 255),) * 3)
    return st.builds(_encode, sizes, colours, st.just(image_format))


# Hypothesis also draws constants from the project's modules imported at the time of each draw;
# which ones are imported depends on the order and timing of imports (other test modules, lazy
# imports in threads), so the same seed would draw other cases. The test draws from Hypothesis's
# own constants only: the same cases on every run (restored after the module, see below).
_LOCAL_CONSTANTS = hypothesis_providers._get_local_constants
hypothesis_providers._get_local_constants = hypothesis_providers.Constants
hypothesis_providers.CONSTANTS_CACHE.cache.clear()


@pytest.fixture(scope="module", autouse=True)
def _own_constants_only() -> Iterator[None]:
    yield
    hypothesis_providers._get_local_constants = _LOCAL_CONSTANTS
    hypothesis_providers.CONSTANTS_CACHE.cache.clear()


# Image parts (POST /items, POST /search/image) of the types the gateway allows: real images, so
# that requests the document calls valid are valid. Bytes that do not decode are the negative
# cases' business.
for _media_type in DEFAULT_UPLOAD_TYPES:
    schemathesis.openapi.media_type(_media_type, _image_bytes(_format(_media_type)))
schema = schemathesis.openapi.from_dict(create_app().openapi(), config=CONFIG)


@functools.cache
def _body_validator(path: str, method: str, media_type: str) -> jsonschema_rs.Validator:
    document = schema.raw_schema
    body = document["paths"][path][method]["requestBody"]["content"][media_type]["schema"]
    # References point into the document's components; keep them reachable from the root.
    return jsonschema_rs.validator_for(
        {**body, "components": document["components"]}, validate_formats=True
    )


@functools.cache
def _repeatable_fields(path: str, method: str, media_type: str) -> frozenset[str]:
    """The form fields whose schema allows a list (one_or_many)."""
    document = schema.raw_schema
    body = document["paths"][path][method]["requestBody"]["content"][media_type]["schema"]
    if "$ref" in body:
        body = document["components"]["schemas"][body["$ref"].rsplit("/", 1)[1]]
    return frozenset(
        name
        for name, field in body.get("properties", {}).items()
        if any(branch.get("type") == "array" for branch in field.get("anyOf", []))
    )


def valid_after_all(case: schemathesis.Case) -> None:
    """A "negative" case whose only invalid part, the body, is valid as sent is a positive one.
    schemathesis 4.32.5 negates one branch of an anyOf as if it were the whole schema, and the
    value it makes is often one another branch accepts (a number where an attribute's boolean
    was); and it misses some mutations a form undoes (a tag true is the tag "true"). The server
    rightly accepts those, and must."""
    meta = case.meta
    if meta is None or case.media_type is None or not isinstance(case.body, dict | list):
        return
    negative = {
        location
        for location, component in meta.components.items()
        if component.mode == schemathesis.GenerationMode.NEGATIVE
    }
    if negative != {ParameterLocation.BODY}:
        return
    operation = case.operation
    validator = _body_validator(operation.path, operation.method.lower(), case.media_type)
    repeatable = _repeatable_fields(operation.path, operation.method.lower(), case.media_type)
    if validator.is_valid(_as_sent(case.body, case.media_type, repeatable)):
        meta.components[ParameterLocation.BODY].mode = schemathesis.GenerationMode.POSITIVE
        meta.generation.mode = schemathesis.GenerationMode.POSITIVE


def _as_sent(body: object, media_type: str, repeatable: frozenset[str]) -> object:
    """The body as the server reads it. A multipart form carries text: true is the text "true",
    a list of one is one field, and an empty field is an absent one (FastAPI's forms, except for
    a repeatable field: there it is an empty item); its JSON parts (attributes, filters) stay
    JSON, and files are bytes, which the document calls strings."""
    if not media_type.startswith("multipart/") or not isinstance(body, dict):
        return body
    sent: dict[str, object] = {}
    for name, value in body.items():
        if isinstance(value, bytes):
            sent[name] = value.decode("latin-1")
        elif isinstance(value, dict):
            sent[name] = value
        elif isinstance(value, list):
            sent[name] = [_text(v) for v in value]
        elif _text(value) != "" or name in repeatable:
            sent[name] = _text(value)
    return sent


def _text(value: object) -> str:
    return value if isinstance(value, str) else json.dumps(value)


def with_an_image(case: schemathesis.Case) -> None:
    """The examples phase fills a missing image part with arbitrary bytes ("0"), not with the
    strategy registered for its media type: a positive case gets a real image instead."""
    body = case.body
    if (
        case.meta is not None
        and case.meta.generation.mode == schemathesis.GenerationMode.POSITIVE
        and isinstance(body, dict)
        and "image" in body
        and not _is_image(body["image"])
    ):
        media_type = (case.multipart_content_types or {}).get("image", "image/png")
        body["image"] = _encode((2, 2), (255, 0, 0), _format(media_type))


_SERIAL = itertools.count(1)


def unique_in_the_run(case: schemathesis.Case) -> None:
    """Every principal, collection and image a valid stateful step creates is new to the stack,
    so that it is created (not a 409 for a name an earlier scenario took) and the scenario's
    later steps read, change and delete it."""
    body = case.body
    if (
        case.meta is None
        or case.meta.generation.mode != schemathesis.GenerationMode.POSITIVE
        or case.method.upper() != "POST"
        or not isinstance(body, dict)
    ):
        return
    serial = next(_SERIAL)
    name = body.get("name")
    if case.path == "/admin/principals" and isinstance(name, str) and NAME.fullmatch(name):
        body["name"] = f"{name[:100]}.{serial}"
    elif case.path == "/collections" and isinstance(name, str) and COLLECTION.fullmatch(name):
        body["name"] = f"{name[:40]}-{serial}"
    elif case.path == "/items" and _is_image(body.get("image")):
        media_type = (case.multipart_content_types or {}).get("image", "image/png")
        size = (1 + serial % 32, 1 + serial // 32 % 32)
        body["image"] = _encode(size, (serial % 256, serial // 256 % 256, 7), _format(media_type))


# The fuzzer's token, its principal and the decoy (set by the gateway_url fixture).
_TARGET: dict[str, str] = {}
# Coverage cases are built when pytest collects this module, before any stack exists: they carry
# this placeholder, which the test swaps for the real token.
COLLECTION_TIME_TOKEN = "token-of-the-fuzz-principal"


@schema.auth(refresh_interval=None)
class FuzzPrincipal:
    def get(self, case: schemathesis.Case, context: schemathesis.AuthContext) -> str:
        return _TARGET.get("token", COLLECTION_TIME_TOKEN)

    def set(self, case: schemathesis.Case, data: str, context: schemathesis.AuthContext) -> None:
        case.headers = {**(case.headers or {}), "Authorization": f"Bearer {data}"}


def prepare(case: schemathesis.Case) -> None:
    """What every case goes through before it is sent (see the module's docstring)."""
    if case.headers and case.headers.get("Authorization") == f"Bearer {COLLECTION_TIME_TOKEN}":
        case.headers["Authorization"] = f"Bearer {_TARGET['token']}"
    if case.path_parameters and case.path_parameters.get("name") == _TARGET["principal"]:
        case.path_parameters["name"] = _TARGET["decoy"]
    valid_after_all(case)
    with_an_image(case)


@schema.parametrize()
@hypothesis.settings(deadline=None, suppress_health_check=list(HealthCheck), database=None)
def test_every_operation_keeps_its_contract(case: schemathesis.Case, gateway_url: str) -> None:
    prepare(case)
    case.call_and_validate(base_url=gateway_url)


def test_operation_sequences_keep_their_contract(gateway_url: str) -> None:
    """Scenarios of linked steps (create, then read, change and delete what was created). A
    failed check is recorded, not raised, so that Hypothesis never replays a scenario against a
    stack its first run changed; a replay that meets such a change (FlakyStrategyDefinition)
    ends that run, and the next run goes on with the next seed until SCENARIOS have run."""
    failures: dict[str, str] = {}
    scenarios = 0

    class Sequences(schema.as_state_machine()):  # type: ignore[misc]
        def setup(self) -> None:
            nonlocal scenarios
            scenarios += 1

        def before_call(self, case: schemathesis.Case) -> None:
            prepare(case)
            unique_in_the_run(case)

        def get_call_kwargs(self, case: schemathesis.Case) -> dict[str, Any]:
            return {"base_url": gateway_url}

        def validate_response(
            self, response: Any, case: schemathesis.Case, *args: Any, **kwargs: Any
        ) -> None:
            try:
                super().validate_response(response, case, *args, **kwargs)
            except FailureGroup as exc:
                for failure in exc.exceptions:
                    failures.setdefault(f"{case.operation.label}: {failure.title}", str(exc))

    for attempt in range(5):
        if scenarios >= SCENARIOS:
            break
        hypothesis.seed(SEED + attempt)(Sequences)
        try:
            Sequences.run(
                settings=hypothesis.settings(
                    max_examples=SCENARIOS - scenarios,
                    stateful_step_count=STEPS,
                    phases=[Phase.generate],
                    database=None,
                    deadline=None,
                    suppress_health_check=list(HealthCheck),
                )
            )
        except FlakyStrategyDefinition:
            continue
    assert scenarios >= SCENARIOS
    assert not failures, "\n\n".join(failures.values())
