"""The ASGI app of `companion serve`: OpenAI's speech endpoint over the session, with conversation memory.

The model loads once, in a thread the lifespan handler starts (``/health`` says "loading" until it is
ready). Every speech request becomes a job in the speech worker's bounded FIFO (up to engine.max_batch
of them are spoken together); its audio streams back as the engine generates it. Auth is one dependency; every error goes through one handler that writes
OpenAI's error JSON (companion/server/errors.py). See docs/serve.md.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import re
import threading
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Annotated, Any

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict

from companion.config import Settings
from companion.errors import CompanionError
from companion.server.encoders import CONTENT_TYPES, FORMATS, make_encoder
from companion.server.errors import APIError, install_handlers
from companion.server.keys import ANONYMOUS, Caller
from companion.server.middleware import RequestBody, RequestMetrics
from companion.server.state import ServerState
from companion.server.worker import Job, QueueFull

log = logging.getLogger("companion.serve")

CONVERSATION_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}$")
DEFAULT_VOICE = "default"
CLIENT_GONE = 499  # nginx's "client closed request": counted as a hang-up, never as an error


class ClientGone(Exception):
    """The client hung up before the first audio (or before its answer): nobody to answer."""


class VoiceRef(BaseModel):
    id: str


class SpeechRequest(BaseModel):
    """OpenAI's body, plus ``conversation``. Unknown fields (e.g. ``instructions``) are ignored."""

    model_config = ConfigDict(extra="ignore")

    model: str = ""
    input: str
    voice: str | VoiceRef
    response_format: str = "mp3"
    speed: float = 1.0
    stream_format: str = "audio"
    conversation: str | None = None


def _state(request: Request) -> ServerState:
    """The server's state, kept on the app (every route reads it from there)."""
    return request.app.state.companion  # type: ignore[no-any-return]


def _caller(request: Request) -> Caller:
    """Who sent the request (the key's conversations); 401 when a key is needed and this one is not known."""
    state = _state(request)
    if not state.needs_key():
        return ANONYMOUS
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    found = state.identify(token.strip()) if scheme.lower() == "bearer" else None
    if found is None:
        raise APIError(401, "missing or wrong API key: send the header 'Authorization: Bearer KEY'",
                       code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
    return found


Who = Annotated[Caller, Depends(_caller)]


def create_app(settings: Settings, api_key: str | None = None, on_fatal: Callable[[str], None] | None = None,
               keys: Any = None) -> FastAPI:
    """The app. With ``api_key`` (``COMPANION_API_KEY``) or named keys in ``keys`` (a KeyStore), every
    request but ``/health`` must send one as ``Authorization: Bearer KEY``."""
    state = ServerState(settings, api_key, on_fatal, keys)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        loader = threading.Thread(target=state.load, name="companion-load", daemon=True)
        loader.start()
        yield
        await asyncio.to_thread(loader.join)
        await asyncio.to_thread(state.close)

    app = FastAPI(title="companion", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.companion = state
    install_handlers(app)
    app.add_middleware(RequestBody, max_bytes=settings.serve.max_body_bytes,
                       timeout=settings.serve.body_timeout_seconds)
    if settings.serve.cors_origins:
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=settings.serve.cors_origins, allow_methods=["*"],
                           allow_headers=["*"])

    app.add_middleware(RequestMetrics, metrics=state.metrics)

    app.router.routes.extend(routes.routes)  # the routes themselves, not a router in a router: 405 lists their methods
    return app


# ---- routes (each reads the server's state with _state) -------------------------------------------------


routes = APIRouter()
AUTH = [Depends(_caller)]


@routes.get("/health")
async def health(request: Request) -> JSONResponse:
    state = _state(request)
    status = "ready" if state.ready.is_set() else "failed" if state.failure else "loading"
    body: dict[str, Any] = {"status": status}
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if state.needs_key() and scheme.lower() == "bearer" and state.identify(token.strip()) is not None:
        body["model"] = state.settings.model.id  # the model (maybe a local path) only for a known key
    return JSONResponse(body, status_code=200 if status == "ready" else 503)


@routes.get("/metrics", dependencies=AUTH)
async def metrics(request: Request) -> PlainTextResponse:
    state = _state(request)
    w = state.worker
    refused = (state.refusals.over_cap, state.refusals.slow_headers)
    text = state.metrics.render(w.depth if w else 0, w.generating if w else 0, state.ready.is_set(), refused,
                                state.streams())
    return PlainTextResponse(text, media_type="text/plain; version=0.0.4")


@routes.get("/v1/models", dependencies=AUTH)
async def models(request: Request) -> dict[str, Any]:
    name = _state(request).settings.serve.model_name
    return {"object": "list", "data": [{"id": name, "object": "model", "created": 0, "owned_by": "companion"}]}


@routes.get("/v1/audio/voices", dependencies=AUTH)
def voices(request: Request) -> dict[str, Any]:
    return {"object": "list", "data": _voice_list(_ready(_state(request)))}


@routes.post("/v1/audio/speech")
async def speech(body: SpeechRequest, request: Request, who: Who) -> Response:
    received = time.perf_counter()
    state = _state(request)
    text, voice, fmt = _check(body, state.settings)
    _ready(state)
    voice = _resolve_voice(state, voice)  # profiles are re-read only when a file changed: a few stat calls
    _check_speech(state, text)
    conversations, conversation = state.conversations, body.conversation
    job = Job(asyncio.get_running_loop(), key=(who.namespace, conversation) if conversation is not None else None)
    job.speak = lambda cancel: conversations.speak(text, voice, conversation, cancel, who.namespace, job.all_sent)
    try:
        first = await _start(state, job, request)
    except ClientGone:
        return Response(status_code=CLIENT_GONE)
    if first[0] == "error":
        raise _generation_error(state, first[1])
    stream = _audio_events(state, job, request, first, fmt, body.stream_format == "sse", received, len(text))
    if body.stream_format == "sse":
        return StreamingResponse(stream, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
    return StreamingResponse(stream, media_type=CONTENT_TYPES[fmt])


@routes.get("/v1/conversations/{conversation}", response_model=None)
async def describe(conversation: str, request: Request, who: Who) -> Any:
    return await _on_conversation(request, who, conversation, lambda c: c.describe(conversation, who.namespace))


@routes.delete("/v1/conversations/{conversation}", response_model=None)
async def clear(conversation: str, request: Request, who: Who) -> Any:
    done = await _on_conversation(request, who, conversation, lambda c: c.clear(conversation, who.namespace))
    return done if isinstance(done, Response) else {"id": conversation, "object": "conversation.cleared", "cleared": True}


async def _on_conversation(request: Request, who: Caller, conversation: str, act: Callable[[Any], Any]) -> Any:
    """``act(conversations)`` in the conversation's queue order; 404 when it has nothing (None or False)."""
    state = _state(request)
    _check_conversation(conversation)
    try:
        found = await _act(state, request, lambda: act(state.conversations), (who.namespace, conversation))
    except ClientGone:
        return Response(status_code=CLIENT_GONE)
    if found is None or found is False:
        raise APIError(404, f"no conversation '{conversation}'", param="conversation")
    return found


# ---- checks ---------------------------------------------------------------------------------------


def _ready(state: ServerState) -> ServerState:
    if not state.ready.is_set():
        message = state.failure or "the model is still loading: try again shortly (GET /health says when it is ready)"
        raise APIError(503, message, headers={"Retry-After": str(state.settings.serve.retry_after_seconds)})
    return state


def _check(body: SpeechRequest, settings: Settings) -> tuple[str, str, str]:
    """(text, voice name, format) of a valid request, or a 400 naming the field."""
    text = body.input
    if not text.strip():
        raise APIError(400, "'input' is empty: give the text to speak", param="input", code="empty_input")
    limit = settings.serve.max_input_chars
    if len(text) > limit:
        raise APIError(400, f"'input' has {len(text)} characters; the limit is {limit}: split it into shorter requests",
                       param="input", code="input_too_long")
    fmt = body.response_format.lower()
    if fmt not in FORMATS:
        raise APIError(400, f"response_format '{body.response_format}' is not supported: use one of {', '.join(FORMATS)}",
                       param="response_format", code="unsupported_format")
    if body.stream_format not in ("audio", "sse"):
        raise APIError(400, f"stream_format '{body.stream_format}' is not supported: use audio or sse",
                       param="stream_format", code="unsupported_stream_format")
    if not 0.25 <= body.speed <= 4.0:
        raise APIError(400, f"speed {body.speed} is out of range: use a value from 0.25 to 4.0", param="speed",
                       code="invalid_speed")
    if body.conversation is not None:
        _check_conversation(body.conversation)
    voice = body.voice.id if isinstance(body.voice, VoiceRef) else body.voice
    return text, voice, fmt


def _check_conversation(conversation: str) -> None:
    if not CONVERSATION_RE.match(conversation):
        raise APIError(400, "'conversation' must be 1-128 letters, digits or _ . : - (starting with a letter or digit)",
                       param="conversation")


def _resolve_voice(state: ServerState, name: str) -> str:
    """A voice profile's name (never a path); 400 otherwise."""
    try:
        known = state.voices.names()
    except CompanionError as err:
        raise APIError(500, f"cannot read the voice profiles: {err}") from None
    if name in known or name == DEFAULT_VOICE:
        return name
    listed = ", ".join([DEFAULT_VOICE, *(n for n in known if n != DEFAULT_VOICE)])
    raise APIError(400, f"unknown voice '{name}': use one of {listed} (GET /v1/audio/voices lists them)",
                   param="voice", code="unknown_voice")


def _check_speech(state: ServerState, text: str) -> None:
    """400 for input with nothing to speak, by the rule `say` and `chat` use (the session's own check)."""
    from companion.session import parse_line
    from companion.session.script import is_clear
    from companion.text import NOTHING_TO_SAY, prepare

    if is_clear(text):
        return
    known = [DEFAULT_VOICE, *state.voices.names()]
    if not any(prepare(part.text) for part in parse_line(text, known)):
        raise APIError(400, f"'input' has {NOTHING_TO_SAY.removeprefix('nothing to say in this text: ')}: give words",
                       param="input", code="no_speech")


def _voice_list(state: ServerState) -> list[dict[str, Any]]:
    import soundfile as sf

    out = []
    profiles = {p.name: p for p in state.voices.list()}
    if DEFAULT_VOICE not in profiles:
        out.append({"id": DEFAULT_VOICE, "name": DEFAULT_VOICE, "speaker": 0, "reference_seconds": None})
    for name, profile in profiles.items():
        try:
            seconds: float | None = round(sum(sf.info(str(f)).duration for f in profile.audio_paths()), 2)
        except Exception:  # noqa: BLE001 - a missing or unreadable file: the duration is unknown
            seconds = None
        out.append({"id": name, "name": name, "speaker": profile.speaker,
                    "reference_seconds": seconds if profile.audio else None})
    return out


# ---- jobs -----------------------------------------------------------------------------------------


async def _start(state: ServerState, job: Job, request: Request) -> tuple[str, Any]:
    """Queue ``job`` and wait for its first event; a client that leaves meanwhile cancels it."""
    assert state.worker is not None
    try:
        state.worker.submit(job)
    except QueueFull:
        retry = str(state.settings.serve.retry_after_seconds)
        raise APIError(429, "the server is busy: every place in its queue is taken; retry later",
                       code="queue_full", headers={"Retry-After": retry}) from None
    except CompanionError as err:
        raise APIError(503, str(err)) from None
    first = asyncio.ensure_future(job.events.get())
    gone = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({first, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
    if not first.done():
        first.cancel()
        state.metrics.add("disconnects")
        state.worker.withdraw(job)
        raise ClientGone()
    return first.result()


async def _disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _act(state: ServerState, request: Request, action: Callable[[], Any], key: tuple[str, str]) -> Any:
    """Run ``action`` on a speech thread (the only ones that touch sessions), in queue order after the
    conversation ``key``'s earlier jobs (raises ClientGone when the client hangs up first)."""
    _ready(state)
    job = Job(asyncio.get_running_loop(), key=key, action=action)
    kind, value = await _start(state, job, request)
    if kind == "error":
        raise _generation_error(state, value)
    return value


def _generation_error(state: ServerState, err: BaseException) -> APIError:
    from companion.session import TextTooLong
    from companion.text import NOTHING_TO_SAY

    if isinstance(err, TextTooLong):
        return APIError(400, str(err), param="input", code="input_too_long")
    if isinstance(err, CompanionError) and str(err) == NOTHING_TO_SAY:  # the session's check, after ours
        return APIError(400, str(err), param="input", code="no_speech")
    state.metrics.error("generation")
    if isinstance(err, CompanionError):
        return APIError(500, str(err), code="generation_failed")
    return APIError(500, f"speech generation failed ({type(err).__name__}: {err}); the server keeps serving",
                    code="generation_failed")


async def _audio_events(state: ServerState, job: Job, request: Request, first: tuple[str, Any], fmt: str,
                        sse: bool, received: float, input_chars: int) -> AsyncIterator[bytes]:
    """The response body: encoded audio as it is generated (raw, or OpenAI's SSE events).

    A hang-up is noticed by Starlette's listener while this waits for a chunk (it cancels this
    generator), and by the check between chunks; either way ``finally`` stops the generation."""
    encoder = make_encoder(fmt)
    sent_first = False
    kind, value = first
    try:
        while True:
            if kind == "audio":
                data = encoder.add(value)
            elif kind == "error":
                state.metrics.error("generation")
                log.error("speech generation failed after audio was sent: %s", value)
                if sse:
                    yield _sse({"type": "error", "error": {"message": f"speech generation failed: {value}",
                                                          "type": "server_error"}})
                    job.finished = True
                    return
                job.finished = True
                raise RuntimeError("speech generation failed after audio was sent")  # the client sees a cut stream
            else:  # end
                data = encoder.finish()
            if data:
                if not sent_first:
                    sent_first = True
                    state.metrics.observe("ttfb", time.perf_counter() - received)
                yield _sse({"type": "speech.audio.delta", "audio": base64.b64encode(data).decode()}) if sse else data
            if kind == "audio":
                job.mark_sent()  # its bytes left (an encoder may still hold a little, or all, of its audio)
            if kind == "end":
                job.finished = True
                if sse:
                    usage = {"input_tokens": input_chars, "output_tokens": 0, "total_tokens": input_chars}
                    yield _sse({"type": "speech.audio.done", "usage": usage})
                return
            kind, value = await job.events.get()
            if kind == "audio" and await request.is_disconnected():
                return
    finally:
        if not job.finished:  # the client hung up (or the server stops): stop generating at the next chunk
            job.stop()
            state.metrics.add("disconnects")


def _sse(event: dict[str, Any]) -> bytes:
    return f"data: {json.dumps(event)}\n\n".encode()

