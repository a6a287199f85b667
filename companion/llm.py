"""Replies written by an LLM behind any OpenAI-compatible server, through the ``openai`` client library.

``LLMClient(settings).reply(messages)`` asks ``{base_url}/chat/completions`` for a streamed reply and
yields its text pieces as they arrive, ``<think>`` blocks removed. The API key is read from the
environment variable *named* by ``llm.api_key_env`` when the client is made; it is sent only in the
Authorization header and never logged, stored or put into an error message. Every failure is one
``CompanionError`` line with a fix (the client library's exceptions never reach the user).
"""

from __future__ import annotations

import json
import logging
import os
import urllib.parse
from collections.abc import Iterable, Iterator
from typing import Any

from companion.config import LLMSettings
from companion.errors import CompanionError

log = logging.getLogger(__name__)


MISSING_EXTRA = "replies from an LLM need the openai package: pip install 'companion[llm]'"


def check_installed() -> None:
    """The rule for an optional feature: refused when it is chosen (here: chat mode), not at first use."""
    import importlib.util

    if importlib.util.find_spec("openai") is None:
        raise CompanionError(MISSING_EXTRA)


class LLMClient:
    def __init__(self, settings: LLMSettings) -> None:
        self.settings = settings
        self.base_url = settings.base_url.rstrip("/")
        self._key = (os.environ.get(settings.api_key_env) if settings.api_key_env else None) or None
        self._client: Any = None

    def reply(self, messages: list[dict[str, str]]) -> Iterator[str]:
        """Stream the assistant's reply to ``messages`` as text pieces (thinking blocks removed).

        Closing the iterator early closes the connection (the server stops writing)."""
        log.debug("POST %s/chat/completions model=%s messages=%d", self.base_url, self.settings.model, len(messages))
        return strip_thinking(self._pieces(messages))

    def close(self) -> None:
        if self._client is not None:
            self._client.close()

    # ---- the request

    def _openai(self) -> Any:
        """The client library's client, made on first use (no retries; redirects are errors)."""
        if self._client is None:
            parts = urllib.parse.urlsplit(self.base_url)
            if parts.scheme not in ("http", "https") or not parts.netloc:
                raise CompanionError(
                    f"llm.base_url {self.settings.base_url!r} is not a valid http(s) URL: "
                    "write it in full, e.g. http://localhost:11434/v1"
                )
            check_installed()
            import openai
            # Following a redirect would resend the key to wherever it points.
            http = openai.DefaultHttpxClient(follow_redirects=False)
            # No key (a local server): the library insists on one, so it gets a stand-in and the header is left out.
            self._client = openai.OpenAI(api_key=self._key or "unused", base_url=self.base_url, max_retries=0,
                                         timeout=self.settings.timeout_seconds, http_client=http)
        return self._client

    def _pieces(self, messages: list[dict[str, str]]) -> Iterator[str]:
        client = self._openai()  # first: it says which package is missing
        import openai

        stream = None
        try:
            headers: dict[str, Any] = {} if self._key else {"Authorization": openai.Omit()}
            stream = client.chat.completions.create(model=self.settings.model, messages=messages, stream=True,
                                                    extra_headers=headers)
            content_type = stream.response.headers.get("content-type", "")
            if "json" in content_type and "event-stream" not in content_type:  # a server that ignores stream
                yield self._message_text(stream.response.read().decode("utf-8", "replace"))
                return
            finished = False
            for chunk in stream:
                choices = getattr(chunk, "choices", None) or []  # a final usage-only chunk has none
                delta = getattr(choices[0], "delta", None) if choices else None
                text = getattr(delta, "content", None)
                finished = finished or bool(choices and getattr(choices[0], "finish_reason", None))
                if isinstance(text, str) and text:
                    yield text
            if not finished:  # the stream ended without the reply's end mark: cut in the middle
                raise self._connection_error(None, started=True)
        except openai.APIStatusError as err:
            raise self._status_error(err) from None
        except openai.APITimeoutError:
            raise self._timeout_error() from None
        except openai.APIConnectionError as err:
            raise self._connection_error(err, started=stream is not None) from None
        except openai.APIError as err:  # an error event inside the stream
            raise CompanionError(f"the LLM server reported an error: {self._redact(_one_line(err.message))}") from None
        except json.JSONDecodeError as err:
            raise self._not_json(err.doc) from None
        except openai.OpenAIError as err:
            raise CompanionError(f"the LLM client failed ({self._redact(_one_line(str(err)))}): check the llm settings") from None
        finally:
            if stream is not None:
                stream.close()

    # ---- errors as one line with a fix

    def _where(self) -> str:
        return f"the LLM server at {self.settings.base_url}"

    def _status_error(self, err: Any) -> CompanionError:
        code, where, env = err.status_code, self._where(), self.settings.api_key_env
        detail = self._redact(_error_detail(err.body))
        if code in (401, 403):
            fix = f"set ${env} to a valid key" if self._key else f"no key was sent: set ${env} (llm.api_key_env names it)"
            return CompanionError(f"{where} refused the request (HTTP {code}{detail}): {fix}")
        if code == 404:
            return CompanionError(
                f"{where} answered HTTP 404{detail}: check llm.model ({self.settings.model!r}) and that llm.base_url ends in /v1"
            )
        if 300 <= code < 400:
            target = err.response.headers.get("location", "elsewhere")
            return CompanionError(f"{where} redirects to {target} (HTTP {code}): set llm.base_url to the new address")
        if code == 429:
            return CompanionError(f"{where} is rate-limiting (HTTP 429{detail}): wait a moment and try again")
        return CompanionError(f"{where} answered HTTP {code}{detail}: check the server's log, then try again")

    def _connection_error(self, err: BaseException | None, *, started: bool) -> CompanionError:
        if started:  # the reply had begun: the server went away in the middle
            return CompanionError(f"{self._where()} dropped the connection in the middle of the reply: try again")
        assert err is not None
        cause: BaseException | None = err
        while cause is not None and not isinstance(cause, ConnectionRefusedError):
            cause = cause.__cause__ or cause.__context__
        if cause is not None or "refused" in str(err.__cause__ or "").lower():
            return CompanionError(
                f"cannot reach the LLM server at {self.settings.base_url} (connection refused): "
                "start the server or fix llm.base_url"
            )
        reason = _one_line(str(err.__cause__ or err))
        return CompanionError(
            f"cannot reach the LLM server at {self.settings.base_url} ({reason}): check llm.base_url and your network"
        )

    def _timeout_error(self) -> CompanionError:
        return CompanionError(
            f"{self._where()} did not answer within {self.settings.timeout_seconds:g} s: "
            "check that it is running, or raise llm.timeout_seconds"
        )

    def _not_json(self, payload: str) -> CompanionError:
        return CompanionError(
            f"{self._where()} sent something that is not JSON ({self._redact(payload[:60])!r}): "
            "check that llm.base_url is an OpenAI-compatible API (often ending in /v1)"
        )

    def _message_text(self, body: str) -> str:
        try:
            data = json.loads(body)
        except json.JSONDecodeError:
            raise self._not_json(body) from None
        if isinstance(data, dict) and data.get("error"):
            raise CompanionError(f"the LLM server reported an error: {self._redact(_error_detail(data).lstrip(': '))}")
        try:
            content = data["choices"][0]["message"]["content"]
        except (KeyError, IndexError, TypeError):
            raise CompanionError(f"{self._where()} sent a reply without choices[0].message: check llm.base_url") from None
        return content if isinstance(content, str) else ""

    def _redact(self, text: str) -> str:
        """``text`` without the API key (servers sometimes echo what they were sent)."""
        return text.replace(self._key, "***") if self._key else text


def _one_line(text: str) -> str:
    return " ".join(str(text).split())[:200]


def _error_detail(body: Any) -> str:
    """``": <server message>"`` from an error body (``{"error": {"message": ...}}`` or its inside), or ``""``."""
    error = body.get("error", body) if isinstance(body, dict) else body
    message = error.get("message") if isinstance(error, dict) else error
    return f": {_one_line(message)}" if isinstance(message, str) and message.strip() else ""


def strip_thinking(pieces: Iterable[str]) -> Iterator[str]:
    """Drop ``<think>...</think>`` blocks (reasoning models), even when tags are split across pieces."""
    buffer, thinking = "", False
    source = iter(pieces)
    try:
        for piece in source:
            buffer += piece
            while buffer:
                tag = "</think>" if thinking else "<think>"
                at = buffer.find(tag)
                if at >= 0:
                    if not thinking and at:
                        yield buffer[:at]
                    buffer, thinking = buffer[at + len(tag) :], not thinking
                    continue
                keep = _partial_tag_len(buffer, tag)  # a tag may be cut between two pieces
                if not thinking and len(buffer) > keep:
                    yield buffer[: len(buffer) - keep]
                buffer = buffer[len(buffer) - keep :] if keep else ""
                break
        if buffer and not thinking:
            yield buffer
    finally:
        getattr(source, "close", lambda: None)()  # stopped early: the connection closes now


def _partial_tag_len(text: str, tag: str) -> int:
    """Length of the longest end of ``text`` that is a beginning of ``tag``."""
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:n]):
            return n
    return 0
