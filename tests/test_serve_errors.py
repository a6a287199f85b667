"""Every error the server answers is OpenAI's JSON shape with the right type: the handlers on a small app.

The app has one route with a typed body (as /v1/audio/speech has), one that raises the server's own
APIError, and two methods on one path; each kind of bad request is sent through FastAPI's test client.
"""

from __future__ import annotations

from typing import Literal

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from pydantic import BaseModel, ConfigDict

from companion.server.errors import APIError, error_body, install_handlers


class Body(BaseModel):
    model_config = ConfigDict(extra="forbid")
    input: str
    speed: float = 1.0
    format: Literal["wav", "mp3"] = "wav"
    tags: list[int] = []


def make_app() -> FastAPI:
    app = FastAPI()
    install_handlers(app)

    @app.post("/speak")
    def speak(body: Body) -> dict:
        return {"ok": body.input}

    @app.get("/busy")
    def busy() -> dict:
        raise APIError(503, "the engine is busy:\nretry soon ", param="input", code="busy",
                       headers={"Retry-After": "2"})  # fmt: skip

    @app.get("/teapot")
    def teapot() -> dict:
        from starlette.exceptions import HTTPException

        raise HTTPException(418, detail="short and stout", headers={"X-Pour": "now"})

    @app.get("/both")
    def both_get() -> dict:
        return {}

    @app.delete("/both")
    def both_delete() -> dict:
        return {}

    return app


@pytest.fixture
def client() -> TestClient:
    """A new app for each test: its handlers are installed while the test runs (what mutation testing
    needs to see which tests reach them)."""
    return TestClient(make_app(), raise_server_exceptions=False)


def error_of(response) -> dict:  # noqa: ANN001
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    assert "\n" not in body["error"]["message"]
    return body["error"]


def test_the_servers_own_error_keeps_status_param_code_headers_and_is_one_line(client: TestClient) -> None:
    r = client.get("/busy")
    assert r.status_code == 503 and r.headers["retry-after"] == "2"
    assert error_of(r) == {"message": "the engine is busy: retry soon", "type": "server_error", "param": "input",
                           "code": "busy"}  # fmt: skip
    assert str(APIError(503, "the engine is busy")) == "the engine is busy"  # what a log line shows


@pytest.mark.parametrize(
    ("body", "param", "code", "message"),
    [
        ({}, "input", "missing_parameter", "'input' is required"),
        ({"input": "hi", "speed": "fast"}, "speed", "invalid_value",
         "'speed': Input should be a valid number, unable to parse string as a number"),
        ({"input": "hi", "format": "flac"}, "format", "invalid_value", "'format': Input should be 'wav' or 'mp3'"),
        ({"input": ["a", "b"]}, "input", "invalid_value", "'input': Input should be a valid string"),
        ({"input": "hi", "voice_id": 3}, "voice_id", "invalid_value", "'voice_id': Extra inputs are not permitted"),
        ({"input": "hi", "tags": [1, "x"]}, "tags", "invalid_value",
         "'tags.1': Input should be a valid integer, unable to parse string as an integer"),
    ],
    ids=["missing", "wrong kind", "not one of", "a list for a string", "unknown field", "inside a list"],
)  # fmt: skip
def test_each_kind_of_bad_field_is_a_400_naming_it(client: TestClient, body, param, code, message) -> None:  # noqa: ANN001
    r = client.post("/speak", json=body)
    assert r.status_code == 400
    assert error_of(r) == {"message": message, "type": "invalid_request_error", "param": param, "code": code}


@pytest.mark.parametrize("raw", [b"{not json", b'{"input": "hi",}', b'{"input": "h'])
def test_a_body_that_is_not_json_is_a_400_saying_so(client: TestClient, raw: bytes) -> None:
    r = client.post("/speak", content=raw, headers={"content-type": "application/json"})
    assert r.status_code == 400
    assert error_of(r) == {"message": "the request body is not valid JSON: send a JSON object",
                           "type": "invalid_request_error", "param": None, "code": "invalid_json"}  # fmt: skip


def test_an_empty_body_is_a_400_asking_for_a_json_object(client: TestClient) -> None:
    r = client.post("/speak", content=b"", headers={"content-type": "application/json"})
    assert r.status_code == 400
    assert error_of(r) == {"message": "the request body is empty: send a JSON object",
                           "type": "invalid_request_error", "param": None, "code": "missing_body"}  # fmt: skip


@pytest.mark.parametrize("raw", [b"[1, 2]", b'"text"', b"42"])
def test_json_that_is_not_an_object_is_a_400_asking_for_one(client: TestClient, raw: bytes) -> None:
    r = client.post("/speak", content=raw, headers={"content-type": "application/json"})
    assert r.status_code == 400
    assert error_of(r) == {"message": "the request body must be a JSON object", "type": "invalid_request_error",
                           "param": None, "code": None}  # fmt: skip


def test_an_unknown_path_is_a_404_naming_method_and_path(client: TestClient) -> None:
    r = client.get("/v1/nothing/here")
    assert r.status_code == 404
    assert error_of(r) == {"message": "no such endpoint: GET /v1/nothing/here", "type": "not_found_error",
                           "param": None, "code": None}  # fmt: skip


def test_a_wrong_method_is_a_405_listing_every_method_the_path_takes(client: TestClient) -> None:
    r = client.post("/both", json={})
    assert r.status_code == 405
    assert r.headers["allow"] == "DELETE, GET"
    error = error_of(r)
    assert error["message"] == "POST is not allowed on /both: use DELETE, GET"
    assert error["type"] == "invalid_request_error"


@pytest.mark.parametrize(
    ("status", "kind"),
    [(400, "invalid_request_error"), (401, "authentication_error"), (404, "not_found_error"),
     (408, "invalid_request_error"), (413, "invalid_request_error"), (415, "invalid_request_error"),
     (429, "rate_limit_error"), (500, "server_error"), (503, "server_error"), (418, "invalid_request_error")],
)  # fmt: skip
def test_each_status_has_openais_error_type(status: int, kind: str) -> None:
    assert error_body(status, "m")["error"] == {"message": "m", "type": kind, "param": None, "code": None}


@pytest.mark.parametrize(
    ("problems", "expected"),
    [
        ([], (400, "invalid request body", None, None)),
        ([{"msg": "bad"}], (400, "'': bad", None, "invalid_value")),
        ([{"loc": ("body", "x")}], (400, "'x': invalid value", "x", "invalid_value")),
        ([{"type": "dict_type", "loc": ("body",), "msg": "m"}], (400, "the request body must be a JSON object", None,
                                                                  None)),
        ([{"type": "missing", "loc": ("body", "voice"), "msg": "m"}, {"type": "missing", "loc": ("body", "input")}],
         (400, "'voice' is required", "voice", "missing_parameter")),
    ],
    ids=["no problem listed", "no location or kind", "no message", "not a mapping", "the first of several"],
)  # fmt: skip
def test_problems_of_every_shape_become_one_line(problems: list, expected: tuple) -> None:
    from fastapi.exceptions import RequestValidationError

    from companion.server.errors import _validation

    err = _validation(RequestValidationError(problems))
    assert (err.status, err.message, err.param, err.code) == expected


def test_any_other_http_error_keeps_its_detail_and_headers(client: TestClient) -> None:
    r = client.get("/teapot")
    assert r.status_code == 418 and r.headers["x-pour"] == "now"
    assert error_of(r) == {"message": "short and stout", "type": "invalid_request_error", "param": None, "code": None}
