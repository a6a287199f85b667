"""Every way an OpenAI-compatible server can fail, each as the one line the user reads, with the key
never in it: statuses (every class, and the edges of the redirect range), errors inside a stream or in
a plain JSON reply, replies cut short, and servers that hang up before answering.

The server is test_llm.py's, with more models: a model named ``status-N`` answers HTTP N, and so on.
"""

from __future__ import annotations

import json
import logging
import socket
from collections.abc import Iterator
from typing import Any

import pytest
from test_llm import KEY, KEY_ENV, FakeOpenAI, Handler, serving

from companion.config import LLMSettings
from companion.errors import CompanionError
from companion.llm import MISSING_EXTRA, LLMClient

EVENTS_AS_TEXT = 'data: {"choices": [{"delta": {"content": "Plain."}}]}\n\ndata: {"choices": [{"delta": {}, "finish_reason": "stop"}]}\n\ndata: [DONE]\n\n'


class MoreHandler(Handler):
    def do_POST(self) -> None:  # noqa: N802
        model = json.loads(self.rfile.read(int(self.headers["Content-Length"])))["model"]
        self.server.requests.append({"path": self.path})
        if model == "chunked-cut":  # a chunked reply whose second chunk never ends
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            event = b'data: {"choices": [{"delta": {"content": "Hello"}}]}\n\n'
            self.wfile.write(b"%x\r\n%s\r\n" % (len(event), event) + b'40\r\ndata: {"choi')
            self.wfile.flush()
            self.connection.shutdown(socket.SHUT_RDWR)
            return
        if model.startswith("status-"):  # status-N[-quiet]: HTTP N with (or without) a message
            code = int(model.split("-")[1])
            body = {} if model.endswith("quiet") else {"error": {"message": f"trouble {code} for {KEY}"}}
            raw = json.dumps(body).encode()
            self.send_response(code)
            if 300 <= code < 400 and not model.endswith("quiet"):
                self.send_header("Location", "http://127.0.0.1:9/v2")
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(raw)))
            self.end_headers()
            self.wfile.write(raw)
            return
        if model == "hang-up":  # closes the connection without a word
            self.close_connection = True
            return
        replies = {
            "error-event": ("text/event-stream", f'data: {{"choices": [{{"delta": {{"content": "Hi"}}}}]}}\n\n'
                                                 f'data: {{"error": {{"message": "overloaded, key {KEY}"}}}}\n\n'),
            "empty-pieces": ("text/event-stream", 'data: {"choices": [{"delta": {"content": ""}}]}\n\n'
                                                  'data: {"choices": [{"delta": {"content": "Hi"}}]}\n\n'
                                                  'data: {"choices": [{"delta": {"content": ""}, "finish_reason": "stop"}]}\n\n'),
            "json-error-x": ("application/json", json.dumps({"error": {"message": "XL model missing"}})),
            "json-long-error": ("application/json", json.dumps({"error": {"message": "word " * 60}})),
            "long-garbage": ("application/json", "<html>" + "y" * 100),
            "no-finish": ("text/event-stream", 'data: {"choices": [{"delta": {"content": "Cut"}}]}\n\ndata: [DONE]\n\n'),
            "text-plain-events": ("text/plain", EVENTS_AS_TEXT),
            "json-error": ("application/json; charset=utf-8", json.dumps({"error": {"message": f"bad {KEY}"}})),
            "json-no-choices": ("application/json", json.dumps({"choices": []})),
            "json-null-content": ("application/json", json.dumps({"choices": [{"message": {"content": None}}]})),
            "json-broken": ("application/json", '{"choices": [{"message": '),
            "json-latin1": ("application/json", None),
        }
        kind, text = replies[model]
        raw = text.encode() if text is not None else b'{"choices": [{"message": {"content": "caf\\u00e9 \xe9"}}]}'
        self.send_response(200)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(raw)))
        self.end_headers()
        self.wfile.write(raw)


@pytest.fixture
def server() -> Iterator[FakeOpenAI]:
    yield from serving(MoreHandler)


@pytest.fixture(autouse=True)
def api_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(KEY_ENV, KEY)


def client(server: FakeOpenAI, model: str, **kw: Any) -> LLMClient:
    return LLMClient(LLMSettings(enabled=True, base_url=server.base_url, model=model, api_key_env=KEY_ENV, **kw))


def error(llm: LLMClient, caplog: pytest.LogCaptureFixture) -> str:
    caplog.set_level(logging.DEBUG, logger="companion")
    with pytest.raises(CompanionError) as info:
        list(llm.reply([{"role": "user", "content": "hi"}]))
    message = str(info.value)
    assert "\n" not in message and KEY not in message and KEY not in caplog.text
    return message


@pytest.mark.parametrize(
    ("code", "says"),
    [
        (429, "is rate-limiting (HTTP 429: trouble 429 for ***): wait a moment and try again"),
        (430, "answered HTTP 430: trouble 430 for ***: check the server's log, then try again"),
        (500, "answered HTTP 500: trouble 500 for ***: check the server's log, then try again"),
        (400, "answered HTTP 400: trouble 400 for ***: check the server's log, then try again"),
        (403, f"refused the request (HTTP 403: trouble 403 for ***): set ${KEY_ENV} to a valid key"),
        (300, "redirects to http://127.0.0.1:9/v2 (HTTP 300): set llm.base_url to the new address"),
        (399, "redirects to http://127.0.0.1:9/v2 (HTTP 399): set llm.base_url to the new address"),
    ],
)
def test_each_status_is_one_line_with_its_fix(server: FakeOpenAI, caplog, code: int, says: str) -> None:  # noqa: ANN001
    assert error(client(server, f"status-{code}"), caplog) == f"the LLM server at {server.base_url} {says}"


def test_a_status_without_a_message_or_a_redirect_without_a_location(server: FakeOpenAI, caplog) -> None:  # noqa: ANN001
    where = f"the LLM server at {server.base_url}"
    assert error(client(server, "status-503-quiet"), caplog) == \
        f"{where} answered HTTP 503: check the server's log, then try again"
    assert error(client(server, "status-302-quiet"), caplog) == \
        f"{where} redirects to elsewhere (HTTP 302): set llm.base_url to the new address"


def test_an_error_event_inside_the_stream(server: FakeOpenAI, caplog) -> None:  # noqa: ANN001
    assert error(client(server, "error-event"), caplog) == "the LLM server reported an error: overloaded, key ***"


def test_a_stream_that_ends_without_its_end_mark_was_cut(server: FakeOpenAI, caplog) -> None:  # noqa: ANN001
    assert error(client(server, "no-finish"), caplog) == \
        f"the LLM server at {server.base_url} dropped the connection in the middle of the reply: try again"


def test_events_served_as_plain_text_are_still_a_stream(server: FakeOpenAI) -> None:
    assert list(client(server, "text-plain-events").reply([])) == ["Plain."]


def test_plain_json_replies_of_every_shape(server: FakeOpenAI, caplog) -> None:  # noqa: ANN001
    assert error(client(server, "json-error"), caplog) == "the LLM server reported an error: bad ***"
    assert error(client(server, "json-no-choices"), caplog) == \
        f"the LLM server at {server.base_url} sent a reply without choices[0].message: check llm.base_url"
    assert list(client(server, "json-null-content").reply([])) == []
    assert error(client(server, "json-broken"), caplog) == (
        f"the LLM server at {server.base_url} sent something that is not JSON ('{{\"choices\": [{{\"message\": '): "
        "check that llm.base_url is an OpenAI-compatible API (often ending in /v1)")
    assert list(client(server, "json-latin1").reply([])) == ["café \ufffd"]  # a stray byte does not stop it


def test_a_server_that_hangs_up_before_answering(server: FakeOpenAI, caplog) -> None:  # noqa: ANN001
    message = error(client(server, "hang-up"), caplog)
    assert message.startswith(f"cannot reach the LLM server at {server.base_url} (")
    assert message.endswith("): check llm.base_url and your network") and "refused" not in message
    assert "disconnected" in message.lower()  # the reason is the connection's own, not the library's summary


@pytest.mark.parametrize("slashes", ["/", "//"])
def test_a_base_url_with_a_trailing_slash_works(server: FakeOpenAI, slashes: str) -> None:
    settings = LLMSettings(base_url=server.base_url + slashes, model="json-null-content", api_key_env=KEY_ENV)
    assert list(LLMClient(settings).reply([])) == []
    assert server.requests[-1]["path"] == "/v1/chat/completions"


def test_the_request_is_logged_without_the_key(server: FakeOpenAI, caplog) -> None:  # noqa: ANN001
    caplog.set_level(logging.DEBUG, logger="companion")
    list(client(server, "json-null-content").reply([{"role": "user", "content": "a"}] * 3))
    assert [r.getMessage() for r in caplog.records if r.name == "companion.llm"] == [
        f"POST {server.base_url}/chat/completions model=json-null-content messages=3"]
    assert KEY not in caplog.text


def test_close_before_any_request_and_after_one(server: FakeOpenAI) -> None:
    llm = client(server, "json-null-content")
    llm.close()  # nothing opened yet
    list(llm.reply([]))
    http = llm._client
    assert http is not None and not http.is_closed()
    llm.close()
    assert http.is_closed()


def test_without_the_openai_package_the_fix_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    from companion import llm

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "openai" else real(name, *a))
    with pytest.raises(CompanionError) as info:
        llm.check_installed()
    assert str(info.value) == MISSING_EXTRA == "replies from an LLM need the openai package: pip install 'companion[llm]'"


def test_a_connection_cut_inside_a_chunk_after_the_first_words(server: FakeOpenAI) -> None:
    stream = client(server, "chunked-cut").reply([])
    assert next(stream) == "Hello"
    with pytest.raises(CompanionError) as info:
        next(stream)
    assert str(info.value) == f"the LLM server at {server.base_url} dropped the connection in the middle of the reply: try again"


def test_empty_pieces_are_not_handed_on(server: FakeOpenAI) -> None:
    assert list(client(server, "empty-pieces").reply([])) == ["Hi"]


def test_error_texts_keep_their_first_letter_and_stop_at_200_characters(server: FakeOpenAI, caplog) -> None:  # noqa: ANN001
    assert error(client(server, "json-error-x"), caplog) == "the LLM server reported an error: XL model missing"
    long = error(client(server, "json-long-error"), caplog)
    assert long == "the LLM server reported an error: " + ("word " * 40).strip()  # 200 characters, then cut
    assert error(client(server, "long-garbage"), caplog) == (
        f"the LLM server at {server.base_url} sent something that is not JSON ({('<html>' + 'y' * 54)!r}): "
        "check that llm.base_url is an OpenAI-compatible API (often ending in /v1)")


def test_a_timeout_names_the_setting_that_raises_it(server: FakeOpenAI, caplog) -> None:  # noqa: ANN001
    from test_llm import serving as plain_serving

    gen = plain_serving()
    slow = next(gen)
    try:
        assert error(client(slow, "stall", timeout_seconds=0.3), caplog) == (
            f"the LLM server at {slow.base_url} did not answer within 0.3 s: check that it is running, "
            "or raise llm.timeout_seconds")
    finally:
        gen.close()


@pytest.mark.parametrize("url", ["ftp://127.0.0.1/v1", "http:///v1", "127.0.0.1:8000/v1"])
def test_a_base_url_that_is_not_http_with_a_host_is_refused(url: str, caplog) -> None:  # noqa: ANN001
    assert error(LLMClient(LLMSettings(base_url=url, api_key_env=KEY_ENV)), caplog) == (
        f"llm.base_url {url!r} is not a valid http(s) URL: write it in full, e.g. http://localhost:11434/v1")


def test_https_is_a_valid_scheme(caplog) -> None:  # noqa: ANN001
    """An https address passes the check and fails only at connecting (nothing listens there)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    message = error(LLMClient(LLMSettings(base_url=f"https://127.0.0.1:{port}/v1", api_key_env=KEY_ENV)), caplog)
    assert message.startswith(f"cannot reach the LLM server at https://127.0.0.1:{port}/v1")


@pytest.mark.parametrize(("pieces", "spoken"), [(["<th", "ink>x</think>Hi"], ["Hi"]), (["<", "think>a</think>", "<"], ["<"]),
                                                (["Hi <", "b"], ["Hi ", "<b"])])  # fmt: skip
def test_thinking_is_filtered_without_empty_pieces(pieces: list[str], spoken: list[str]) -> None:
    from companion.llm import strip_thinking

    assert list(strip_thinking(pieces)) == spoken
