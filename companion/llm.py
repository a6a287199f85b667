"""Optional replies written by an LLM behind any OpenAI-compatible server (standard library only).

``LLMClient(settings).reply(messages)`` POSTs ``{base_url}/chat/completions`` with ``stream: true``
and yields the text pieces of the server-sent events as they arrive. The API key is read from the
environment variable *named* by ``llm.api_key_env`` when the client is made; it is sent only in the
Authorization header and never logged, stored or put into an error message.

``Conversation`` keeps the message list bounded: the system prompt plus the last exchanges.
"""

from __future__ import annotations

import json
import logging
import os
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterable, Iterator
from typing import Any

from companion.config import LLMSettings
from companion.errors import CompanionError

log = logging.getLogger(__name__)

CLEAR_TOKEN = "$CLEAR$"  # a user message that is exactly this forgets the conversation


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    """Redirects are errors: following one would resend the key to wherever it points."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):  # type: ignore[no-untyped-def]
        return None


_OPENER = urllib.request.build_opener(_NoRedirect)


class LLMClient:
    def __init__(self, settings: LLMSettings) -> None:
        self.settings = settings
        self.url = settings.base_url.rstrip("/") + "/chat/completions"
        self._key = (os.environ.get(settings.api_key_env) if settings.api_key_env else None) or None

    def reply(self, messages: list[dict[str, str]]) -> Iterator[str]:
        """Stream the assistant's reply to ``messages`` as text pieces (thinking blocks removed)."""
        log.debug("POST %s model=%s messages=%d", self.url, self.settings.model, len(messages))
        response = self._open(messages)
        try:
            yield from _strip_thinking(self._pieces(response))
        finally:
            response.close()

    def _open(self, messages: list[dict[str, str]]) -> Any:
        parts = urllib.parse.urlsplit(self.url)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise CompanionError(
                f"llm.base_url {self.settings.base_url!r} is not a valid http(s) URL: "
                "write it in full, e.g. http://localhost:11434/v1"
            )
        body = json.dumps({"model": self.settings.model, "messages": messages, "stream": True}).encode()
        headers = {"Content-Type": "application/json", "Accept": "text/event-stream"}
        if self._key:
            headers["Authorization"] = f"Bearer {self._key}"
        try:
            request = urllib.request.Request(self.url, data=body, headers=headers, method="POST")
            return _OPENER.open(request, timeout=self.settings.timeout_seconds)
        except urllib.error.HTTPError as err:
            raise self._http_error(err) from None
        except (OSError, ValueError) as err:  # URLError is an OSError
            raise self._connection_error(err) from None

    def _pieces(self, response: Any) -> Iterator[str]:
        """Text pieces from an SSE stream (or from one JSON body, for servers that ignore stream)."""
        try:
            content_type = response.headers.get("Content-Type", "")
            if "json" in content_type and "event-stream" not in content_type:
                data = self._parse(response.read().decode("utf-8", "replace"))
                yield _message_text(data, self)
                return
            for raw in response:
                line = raw.decode("utf-8", "replace").strip()
                if not line.startswith("data:"):
                    continue  # blank separators, ": keep-alive" comments, "event:" lines
                payload = line[5:].strip()
                if payload == "[DONE]":
                    return
                text = _delta_text(self._parse(payload))
                if text:
                    yield text
        except TimeoutError:
            raise self._timeout_error() from None
        except OSError as err:
            raise CompanionError(f"the LLM server at {self.settings.base_url} dropped the connection ({err}): try again") from None

    def _parse(self, payload: str) -> dict[str, Any]:
        try:
            data = json.loads(payload)
        except json.JSONDecodeError:
            raise CompanionError(
                f"the LLM server at {self.settings.base_url} sent something that is not JSON "
                f"({self._redact(payload[:60])!r}): check that llm.base_url is an OpenAI-compatible API (often ending in /v1)"
            ) from None
        if not isinstance(data, dict):
            raise CompanionError(f"the LLM server at {self.settings.base_url} sent an unexpected reply: check llm.base_url")
        if "error" in data:
            raise CompanionError(f"the LLM server reported an error: {self._redact(_error_message(data))}")
        return data

    def _http_error(self, err: urllib.error.HTTPError) -> CompanionError:
        detail = self._redact(_error_body(err))
        where = f"the LLM server at {self.settings.base_url}"
        env = self.settings.api_key_env
        if err.code in (401, 403):
            fix = f"set ${env} to a valid key" if self._key else f"no key was sent: set ${env} (llm.api_key_env names it)"
            return CompanionError(f"{where} refused the request (HTTP {err.code}{detail}): {fix}")
        if err.code == 404:
            return CompanionError(
                f"{where} answered HTTP 404{detail}: check llm.model ({self.settings.model!r}) and that llm.base_url ends in /v1"
            )
        if 300 <= err.code < 400:
            target = err.headers.get("Location", "elsewhere")
            return CompanionError(f"{where} redirects to {target} (HTTP {err.code}): set llm.base_url to the new address")
        if err.code == 429:
            return CompanionError(f"{where} is rate-limiting (HTTP 429{detail}): wait a moment and try again")
        return CompanionError(f"{where} answered HTTP {err.code}{detail}: check the server's log, then try again")

    def _connection_error(self, err: BaseException) -> CompanionError:
        reason = getattr(err, "reason", err)
        base = self.settings.base_url
        if isinstance(reason, TimeoutError):
            return self._timeout_error()
        if isinstance(err, ValueError):
            return CompanionError(f"llm.base_url {base!r} is not a valid URL ({err}): fix it in the config")
        if isinstance(reason, ConnectionRefusedError):
            return CompanionError(f"cannot reach the LLM server at {base} (connection refused): start the server or fix llm.base_url")
        return CompanionError(f"cannot reach the LLM server at {base} ({reason}): check llm.base_url and your network")

    def _timeout_error(self) -> CompanionError:
        return CompanionError(
            f"the LLM server at {self.settings.base_url} did not answer within {self.settings.timeout_seconds:g} s: "
            "check that it is running, or raise llm.timeout_seconds"
        )

    def _redact(self, text: str) -> str:
        """``text`` without the API key (servers sometimes echo what they were sent)."""
        return text.replace(self._key, "***") if self._key else text


def _delta_text(data: dict[str, Any]) -> str:
    choices = data.get("choices") or []
    if not choices:
        return ""  # e.g. a final usage-only chunk
    delta = choices[0].get("delta") or choices[0].get("message") or {}
    content = delta.get("content") if isinstance(delta, dict) else None
    return content if isinstance(content, str) else ""


def _message_text(data: dict[str, Any], client: LLMClient) -> str:
    try:
        content = data["choices"][0]["message"]["content"]
    except (KeyError, IndexError, TypeError):
        raise CompanionError(
            f"the LLM server at {client.settings.base_url} sent a reply without choices[0].message: check llm.base_url"
        ) from None
    return content if isinstance(content, str) else ""


def _error_message(data: dict[str, Any]) -> str:
    error = data.get("error")
    message = error.get("message") if isinstance(error, dict) else error
    return " ".join(str(message).split())[:200]


def _error_body(err: urllib.error.HTTPError) -> str:
    """``": <server message>"`` from an error response's JSON body, or ``""``."""
    try:
        data = json.loads(err.read(4096).decode("utf-8", "replace"))
    except (OSError, ValueError):
        return ""
    return f": {_error_message(data)}" if isinstance(data, dict) and data.get("error") else ""


def _strip_thinking(pieces: Iterable[str]) -> Iterator[str]:
    """Drop ``<think>...</think>`` blocks (reasoning models), even when tags are split across pieces."""
    buffer, thinking = "", False
    for piece in pieces:
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


def _partial_tag_len(text: str, tag: str) -> int:
    """Length of the longest end of ``text`` that is a beginning of ``tag``."""
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:n]):
            return n
    return 0


class Conversation:
    """The messages sent to the LLM: the system prompt plus the last ``max_exchanges`` exchanges."""

    def __init__(self, system_prompt: str, max_exchanges: int = 12, max_chars: int = 16000) -> None:
        self.system_prompt = system_prompt
        self.max_exchanges = max_exchanges
        self.max_chars = max_chars
        self.exchanges: list[tuple[str, str]] = []  # (user, assistant)

    def messages(self, user_text: str | None = None) -> list[dict[str, str]]:
        out = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
        for user, assistant in self.exchanges:
            out += [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
        if user_text is not None:
            out.append({"role": "user", "content": user_text})
        return out

    def clear(self) -> None:
        self.exchanges.clear()

    def add(self, user_text: str, reply: str) -> None:
        """Record one exchange, then drop the oldest ones beyond the limits."""
        self.exchanges.append((user_text, reply))
        while len(self.exchanges) > self.max_exchanges or (
            len(self.exchanges) > 1 and sum(len(u) + len(a) for u, a in self.exchanges) > self.max_chars
        ):
            self.exchanges.pop(0)

    def ask(self, client: LLMClient, user_text: str) -> Iterator[str]:
        """Stream the reply to ``user_text`` and record the exchange (a partial reply if stopped early).

        ``$CLEAR$`` as the whole message forgets the conversation and yields nothing. On an error
        nothing is recorded, so the same question can be asked again.
        """
        if user_text.strip() == CLEAR_TOKEN:
            self.clear()
            return
        pieces: list[str] = []
        try:
            for piece in client.reply(self.messages(user_text)):
                pieces.append(piece)
                yield piece
        except GeneratorExit:  # stopped early: remembered as far as it was heard
            if pieces:
                self.add(user_text, "".join(pieces).strip())
            raise
        self.add(user_text, "".join(pieces).strip())
