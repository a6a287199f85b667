"""The LLM client against a real HTTP server on 127.0.0.1 that speaks the OpenAI streaming format.

The server never sleeps to pace a reply: models that pause ("paced", "stall") wait for the test to
release them (``server.release()``), so no test depends on how fast the machine is.
"""

from __future__ import annotations

import json
import logging
import socket
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from companion.config import LLMSettings
from companion.errors import CompanionError
from companion.llm import LLMClient, strip_thinking
from companion.session.dialogue import Dialogue, Exchange

KEY = "sk-test-4f9d2c-secret"
KEY_ENV = "COMPANION_TEST_LLM_KEY"


class Handler(BaseHTTPRequestHandler):
    """Behaves according to the requested model name; records every request on the server."""

    server: FakeOpenAI

    def log_message(self, format: str, *args: Any) -> None:  # keep pytest output clean
        pass

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.server.requests.append({"path": self.path, "headers": {k.title(): v for k, v in self.headers.items()}, "body": body})
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
        if model == "stall":  # answers nothing until released (the client's timeout fires first)
            self.server.wait()
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.end_headers()
        try:
            for event in self._events(model, body):
                self.wfile.write(event.encode())
                self.wfile.flush()
                self.server.sent.append(event)
        except OSError:  # the client hung up (it was interrupted)
            self.server.hangups += 1
            return
        if model == "die":  # the server dies in the middle of the reply: the connection is cut
            self.connection.shutdown(socket.SHUT_RDWR)

    def _events(self, model: str, body: dict[str, Any]) -> Iterator[str]:
        if model == "bad-json":
            yield 'data: {"choices": [{"delta": {"content": "Hel'
            yield "\n\n"
            return
        if model == "thinker":
            pieces = ["<thi", "nk>plan the answer", "</think>", "Sure", ", here it is."]
        elif model == "echo":
            pieces = [f"You said: {body['messages'][-1]['content']}"]
        elif model == "memory":  # what it was sent, so a test can see the conversation it remembers
            pieces = [f"I have {len(body['messages'])} messages."]
        elif model in ("paced", "die", "bad-middle", "endless"):
            pieces = ["The first", " sentence is here.", " Then the", " second one.", " And the last one."]
        else:
            pieces = ["Hello", " there", ", friend."]
        yield ": keep-alive\n\n"
        yield 'data: {"choices": [{"delta": {"role": "assistant"}}]}\n\n'
        for i, piece in enumerate(pieces):
            if model == "paced" and i in (2, 4):  # after each sentence: wait until the test releases it
                self.server.wait()
            if model == "endless" and i == 2:  # after the first sentence: on release, more than anyone reads
                self.server.wait()
                yield f"data: {json.dumps({'choices': [{'delta': {'content': ' Then the'}}]})}\n\n"
                for _ in range(100_000):  # until a write fails: the client hung up (~100 MB at most)
                    yield ": " + "x" * 1000 + "\n\n"
                return
            if model == "die" and i == 2:
                return
            if model == "bad-middle" and i == 2:
                yield 'data: {"choices": [{"delta": {"content": "Hel\n\n'
                return
            yield f"data: {json.dumps({'choices': [{'delta': {'content': piece}}]})}\n\n"
        yield 'data: {"choices": [{"delta": {}, "finish_reason": "stop"}]}\n\n'
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

    def __init__(self, handler: type[BaseHTTPRequestHandler] = Handler) -> None:
        super().__init__(("127.0.0.1", 0), handler)
        self.requests: list[dict[str, Any]] = []
        self.sent: list[str] = []  # every event written, in order (a test counts them)
        self.hangups = 0  # replies the client stopped reading
        self._gate = threading.Semaphore(0)
        self.closing = False

    def wait(self) -> None:
        """Hold a reply until the test calls ``release`` (or the server shuts down)."""
        while not self.closing and not self._gate.acquire(timeout=0.1):
            pass

    def release(self, times: int = 1) -> None:
        for _ in range(times):
            self._gate.release()

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # a client that hung up early (the tests do that on purpose)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/v1"


def serving(handler: type[BaseHTTPRequestHandler] = Handler) -> Iterator[FakeOpenAI]:
    """A FakeOpenAI answering on 127.0.0.1 from a thread until the generator is closed."""
    srv = FakeOpenAI(handler)
    thread = threading.Thread(target=srv.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield srv
    srv.closing = True  # replies still held end now
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
    assert request["body"] == {"model": "llama", "messages": messages, "stream": True}
    assert "chat/completions" in caplog.text and KEY not in caplog.text


def test_pieces_arrive_before_the_stream_ends(server: FakeOpenAI) -> None:
    stream = _client(server, model="endless").reply([{"role": "user", "content": "hi"}])
    assert next(stream) + next(stream) == "The first sentence is here."
    assert not any("Then" in event for event in server.sent)  # the server holds the rest
    server.release()
    assert next(stream) == " Then the"
    stream.close()  # an interrupted reply: the client hangs up, and the server's next writes fail
    assert _eventually(lambda: server.hangups == 1)


def _eventually(check: Any) -> bool:
    """Poll ``check`` (a count the server keeps) for up to a minute; never a timing assertion."""
    for _ in range(6000):
        if check():
            return True
        threading.Event().wait(0.01)
    return False


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
    message = _error(_client(server, model="stall", timeout_seconds=0.3), caplog)
    assert "did not answer within 0.3 s" in message and "llm.timeout_seconds" in message
    assert len(server.requests) == 1  # no retries


def test_timeout_in_the_middle(server: FakeOpenAI, caplog: pytest.LogCaptureFixture) -> None:
    stream = _client(server, model="paced", timeout_seconds=0.3).reply([])
    assert next(stream) + next(stream) == "The first sentence is here."
    with pytest.raises(CompanionError, match="did not answer within 0.3 s"):
        next(stream)  # the server holds the rest and nobody releases it


def test_server_dies_in_the_middle(server: FakeOpenAI) -> None:
    stream = _client(server, model="die").reply([])
    assert next(stream) + next(stream) == "The first sentence is here."
    with pytest.raises(CompanionError) as info:
        next(stream)
    assert str(info.value) == f"the LLM server at {server.base_url} dropped the connection in the middle of the reply: try again"


def test_malformed_event_in_the_middle(server: FakeOpenAI, caplog: pytest.LogCaptureFixture) -> None:
    stream = _client(server, model="bad-middle").reply([])
    assert next(stream) + next(stream) == "The first sentence is here."
    with pytest.raises(CompanionError, match="sent something that is not JSON"):
        next(stream)


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


def test_dialogue_is_bounded_by_exchanges_and_characters() -> None:
    dialogue = Dialogue(max_exchanges=2)
    for i, text in enumerate(("one", "two", "three"), 1):
        dialogue.put(Exchange(text, f"You said: {text}", seq=i))
    assert [m["content"] for m in dialogue.messages("be brief", "four")] == [
        "be brief", "two", "You said: two", "three", "You said: three", "four"]
    dialogue.put(Exchange("three", "You said: three, and more", partial=True, seq=3))  # a reply that grew
    assert [(e.user, e.reply) for e in dialogue.exchanges] == [("two", "You said: two"), ("three", "You said: three, and more")]
    small = Dialogue(max_exchanges=10, max_chars=40)
    small.put(Exchange("a" * 15, "x" * 10, seq=1))
    small.put(Exchange("b" * 15, "y" * 10, seq=2))
    assert [e.user for e in small.exchanges] == ["b" * 15]  # the older one went over 40 characters
    small.clear()
    assert small.messages(None) == []


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
    for size in range(1, len(text) + 1):
        pieces = [text[i : i + size] for i in range(0, len(text), size)]
        assert "".join(strip_thinking(pieces)) == spoken, size
