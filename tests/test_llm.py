"""The LLM client against a real HTTP server on 127.0.0.1 that speaks the OpenAI streaming format."""

from __future__ import annotations

import json
import logging
import socket
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from companion.config import LLMSettings
from companion.errors import CompanionError
from companion.llm import CLEAR_TOKEN, Conversation, LLMClient

KEY = "sk-test-4f9d2c-secret"
KEY_ENV = "COMPANION_TEST_LLM_KEY"


class Handler(BaseHTTPRequestHandler):
    """Behaves according to the requested model name; records every request on the server."""

    server: FakeOpenAI

    def log_message(self, format: str, *args: Any) -> None:  # keep pytest output clean
        pass

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.server.requests.append({"path": self.path, "headers": dict(self.headers), "body": body})
        if self.path == "/moved/chat/completions":
            self.send_response(307)
            self.send_header("Location", "http://127.0.0.1:9/v1/chat/completions")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        if self.path != "/v1/chat/completions":
            return self._json(404, {"error": {"message": f"no route {self.path}"}})
        if self.headers.get("Authorization") != f"Bearer {KEY}":
            return self._json(401, {"error": {"message": f"Incorrect API key provided: {self.headers.get('Authorization')}"}})
        model = body["model"]
        if model == "missing":
            return self._json(404, {"error": {"message": "The model `missing` does not exist"}})
        if model == "plain-json":
            return self._json(200, {"choices": [{"message": {"role": "assistant", "content": "One piece."}}]})
        if model == "slow":
            time.sleep(1.5)
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.end_headers()
        for event in self._events(model, body):
            self.wfile.write(event.encode())
            self.wfile.flush()

    def _events(self, model: str, body: dict[str, Any]) -> Iterator[str]:
        if model == "bad-json":
            yield 'data: {"choices": [{"delta": {"content": "Hel'
            yield "\n\n"
            return
        if model == "thinker":
            pieces = ["<thi", "nk>plan the answer", "</think>", "Sure", ", here it is."]
        elif model == "echo":
            pieces = [f"You said: {body['messages'][-1]['content']}"]
        else:
            pieces = ["Hello", " there", ", friend."]
        yield ": keep-alive\n\n"
        yield 'data: {"choices": [{"delta": {"role": "assistant"}}]}\n\n'
        for i, piece in enumerate(pieces):
            if model == "dribble" and i == 1:
                time.sleep(1.0)
            yield f"data: {json.dumps({'choices': [{'delta': {'content': piece}}]})}\n\n"
        yield 'data: {"choices": [], "usage": {"total_tokens": 9}}\n\n'
        yield "data: [DONE]\n\n"

    def _json(self, status: int, data: dict[str, Any]) -> None:
        raw = json.dumps(data).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(raw)))
        self.end_headers()
        self.wfile.write(raw)


class FakeOpenAI(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), Handler)
        self.requests: list[dict[str, Any]] = []

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # a client that hung up early (the tests do that on purpose)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/v1"


def serving() -> Iterator[FakeOpenAI]:
    """A FakeOpenAI answering on 127.0.0.1 from a thread until the generator is closed."""
    srv = FakeOpenAI()
    thread = threading.Thread(target=srv.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()


@pytest.fixture
def server() -> Iterator[FakeOpenAI]:
    yield from serving()


@pytest.fixture(autouse=True)
def api_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(KEY_ENV, KEY)


def _client(server: FakeOpenAI, model: str = "llama", **kw: Any) -> LLMClient:
    settings = LLMSettings(enabled=True, base_url=server.base_url, model=model, api_key_env=KEY_ENV, **kw)
    return LLMClient(settings)


def _error(client: LLMClient, caplog: pytest.LogCaptureFixture) -> str:
    caplog.set_level(logging.DEBUG, logger="companion")
    with pytest.raises(CompanionError) as info:
        list(client.reply([{"role": "user", "content": "hi"}]))
    message = str(info.value)
    assert "\n" not in message
    assert KEY not in message and KEY not in caplog.text
    return message


def test_streams_pieces_and_sends_the_key(server: FakeOpenAI, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="companion")
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    pieces = list(_client(server).reply(messages))
    assert pieces == ["Hello", " there", ", friend."]
    (request,) = server.requests
    assert request["headers"]["Authorization"] == f"Bearer {KEY}"
    assert request["headers"]["Accept"] == "text/event-stream"
    assert request["body"] == {"model": "llama", "messages": messages, "stream": True}
    assert "chat/completions" in caplog.text and KEY not in caplog.text


def test_pieces_arrive_before_the_stream_ends(server: FakeOpenAI) -> None:
    start = time.monotonic()
    stream = _client(server, model="dribble").reply([{"role": "user", "content": "hi"}])
    assert next(stream) == "Hello"
    assert time.monotonic() - start < 0.8  # the server waits 1 s before its second piece
    assert next(stream) == " there"
    assert time.monotonic() - start >= 1.0
    stream.close()


def test_thinking_blocks_are_not_spoken(server: FakeOpenAI) -> None:
    assert "".join(_client(server, model="thinker").reply([])) == "Sure, here it is."


def test_plain_json_reply_is_accepted(server: FakeOpenAI) -> None:
    assert list(_client(server, model="plain-json").reply([])) == ["One piece."]


def test_wrong_key_401(server: FakeOpenAI, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setenv(KEY_ENV, KEY + "-wrong")  # the server echoes the bad key in its message
    client = _client(server)
    message = _error(client, caplog)
    assert "refused the request (HTTP 401: Incorrect API key provided: Bearer ***)" in message
    assert f"set ${KEY_ENV} to a valid key" in message
    assert KEY + "-wrong" not in message


def test_missing_key_401(server: FakeOpenAI, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.delenv(KEY_ENV)
    client = _client(server)
    assert f"no key was sent: set ${KEY_ENV}" in _error(client, caplog)
    assert "Authorization" not in server.requests[0]["headers"]


def test_unknown_model_404(server: FakeOpenAI, caplog: pytest.LogCaptureFixture) -> None:
    message = _error(_client(server, model="missing"), caplog)
    assert "HTTP 404: The model `missing` does not exist" in message and "check llm.model ('missing')" in message


def test_wrong_path_404_suggests_v1(server: FakeOpenAI, caplog: pytest.LogCaptureFixture) -> None:
    settings = LLMSettings(base_url=server.base_url.removesuffix("/v1"), api_key_env=KEY_ENV)
    assert "llm.base_url ends in /v1" in _error(LLMClient(settings), caplog)


def test_redirect_is_not_followed(server: FakeOpenAI, caplog: pytest.LogCaptureFixture) -> None:
    settings = LLMSettings(base_url=server.base_url.replace("/v1", "/moved"), api_key_env=KEY_ENV)
    message = _error(LLMClient(settings), caplog)
    assert "redirects to http://127.0.0.1:9/v1/chat/completions (HTTP 307): set llm.base_url" in message
    assert len(server.requests) == 1


def test_bad_json(server: FakeOpenAI, caplog: pytest.LogCaptureFixture) -> None:
    message = _error(_client(server, model="bad-json"), caplog)
    assert "sent something that is not JSON" in message and "OpenAI-compatible API" in message


def test_timeout(server: FakeOpenAI, caplog: pytest.LogCaptureFixture) -> None:
    start = time.monotonic()
    message = _error(_client(server, model="slow", timeout_seconds=0.3), caplog)
    assert "did not answer within 0.3 s" in message and "llm.timeout_seconds" in message
    assert time.monotonic() - start < 1.4


def test_connection_refused(caplog: pytest.LogCaptureFixture) -> None:
    with socket.socket() as s:  # a port that was free a moment ago: nothing listens there
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    client = LLMClient(LLMSettings(base_url=f"http://127.0.0.1:{port}/v1", api_key_env=KEY_ENV))
    message = _error(client, caplog)
    assert message == (
        f"cannot reach the LLM server at http://127.0.0.1:{port}/v1 (connection refused): "
        "start the server or fix llm.base_url"
    )


def test_bad_base_url(caplog: pytest.LogCaptureFixture) -> None:
    message = _error(LLMClient(LLMSettings(base_url="localhost:11434/v1", api_key_env=KEY_ENV)), caplog)
    assert "is not a valid http(s) URL" in message


def test_conversation_keeps_history_bounded_and_clears(server: FakeOpenAI) -> None:
    client = _client(server, model="echo")
    conv = Conversation("be brief", max_exchanges=2)
    for text in ("one", "two", "three"):
        assert "".join(conv.ask(client, text)) == f"You said: {text}"
    sent = server.requests[-1]["body"]["messages"]
    assert [m["content"] for m in sent] == ["be brief", "one", "You said: one", "two", "You said: two", "three"]
    assert conv.messages()[1:] == [
        {"role": "user", "content": "two"},
        {"role": "assistant", "content": "You said: two"},
        {"role": "user", "content": "three"},
        {"role": "assistant", "content": "You said: three"},
    ]
    assert list(conv.ask(client, f"  {CLEAR_TOKEN} ")) == []
    assert conv.messages() == [{"role": "system", "content": "be brief"}]
    assert len(server.requests) == 3  # $CLEAR$ is not sent to the server


def test_conversation_char_limit_and_errors(server: FakeOpenAI) -> None:
    conv = Conversation("", max_exchanges=10, max_chars=40)
    client = _client(server, model="echo")
    "".join(conv.ask(client, "a" * 15))
    "".join(conv.ask(client, "b" * 15))
    assert [u for u, _ in conv.exchanges] == ["b" * 15]  # the older one went over 40 characters
    with pytest.raises(CompanionError):
        "".join(conv.ask(_client(server, model="missing"), "c"))
    assert [u for u, _ in conv.exchanges] == ["b" * 15]  # a failed question is not recorded


def test_conversation_remembers_a_stopped_reply(server: FakeOpenAI) -> None:
    conv = Conversation("sys")
    stream = conv.ask(_client(server), "hi")
    assert next(stream) == "Hello"
    stream.close()
    assert conv.exchanges == [("hi", "Hello")]


@pytest.mark.parametrize(
    ("text", "spoken"),
    [
        ("<think>plan</think>Hi there.", "Hi there."),
        ("Before <think>x</think>after <think>y</think>end", "Before after end"),
        ("a < b and <thin ice>", "a < b and <thin ice>"),
        ("no tags at all", "no tags at all"),
        ("<think>never closed", ""),
    ],
)
def test_thinking_filter_with_every_split(text: str, spoken: str) -> None:
    from companion.llm import _strip_thinking

    for size in range(1, len(text) + 1):
        pieces = [text[i : i + size] for i in range(0, len(text), size)]
        assert "".join(_strip_thinking(pieces)) == spoken, size
