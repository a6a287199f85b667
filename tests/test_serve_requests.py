"""What the speech server answers before a model is needed (companion/server/app.py): each kind of bad
request, the key check, the routes that work while the model loads, and the answers built for what
generation reports. The app is the real one, served by FastAPI's test client without its lifespan (the
model is never loaded: a valid speech request is a 503 until it is), so every case is milliseconds."""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import shutil
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient

from companion.config import Settings, load_settings
from companion.errors import CompanionError
from companion.server.app import (
    ClientGone,
    SpeechRequest,
    _act,
    _audio_events,
    _check,
    _check_speech,
    _generation_error,
    _resolve_voice,
    _start,
    _voice_list,
    create_app,
)
from companion.server.encoders import FORMATS, make_encoder, to_pcm16
from companion.server.errors import APIError
from companion.server.metrics import Metrics
from companion.server.worker import Job, SpeechWorker
from companion.session.context import TextTooLong
from companion.text import NOTHING_TO_SAY
from companion.voices import VoiceProfile, VoiceStore

LOADING = "the model is still loading: try again shortly (GET /health says when it is ready)"
BAD_KEY = "missing or wrong API key: send the header 'Authorization: Bearer KEY'"
BAD_CONVERSATION = "'conversation' must be 1-128 letters, digits or _ . : - (starting with a letter or digit)"


def settings_for_test() -> Settings:
    return load_settings(overrides={"serve": {"max_input_chars": 20, "retry_after_seconds": 7, "model_name": "my-csm"}})


def client(api_key: str | None = None) -> TestClient:
    return TestClient(create_app(settings_for_test(), api_key=api_key), raise_server_exceptions=False)


def speak(c: TestClient, **fields: Any) -> Any:
    return c.post("/v1/audio/speech", json={"input": "Hello there.", "voice": "default", **fields})


def error_of(response: Any, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.text
    return response.json()["error"]


# ---- each kind of bad request, and each limit exactly ------------------------------------------------


@pytest.mark.parametrize(("fields", "param", "code", "message"), [
    ({"input": ""}, "input", "empty_input", "'input' is empty: give the text to speak"),
    ({"input": " \n\t"}, "input", "empty_input", "'input' is empty: give the text to speak"),
    ({"input": "x" * 21}, "input", "input_too_long",
     "'input' has 21 characters; the limit is 20: split it into shorter requests"),
    ({"response_format": "ogg"}, "response_format", "unsupported_format",
     f"response_format 'ogg' is not supported: use one of {', '.join(FORMATS)}"),
    ({"stream_format": "chunks"}, "stream_format", "unsupported_stream_format",
     "stream_format 'chunks' is not supported: use audio or sse"),
    ({"speed": 0.24}, "speed", "invalid_speed", "speed 0.24 is out of range: use a value from 0.25 to 4.0"),
    ({"speed": 4.01}, "speed", "invalid_speed", "speed 4.01 is out of range: use a value from 0.25 to 4.0"),
    ({"conversation": "-starts-badly"}, "conversation", None, BAD_CONVERSATION),
    ({"conversation": "c" * 129}, "conversation", None, BAD_CONVERSATION),
    ({"conversation": "has space"}, "conversation", None, BAD_CONVERSATION),
], ids=["empty", "blank", "one-char-too-long", "format", "stream-format", "too-slow", "too-fast",
        "conversation-start", "conversation-129", "conversation-space"])  # fmt: skip
def test_each_kind_of_bad_speech_request_is_a_400_naming_its_field(fields, param, code, message) -> None:  # noqa: ANN001
    err = error_of(speak(client(), **fields), 400)
    assert err == {"message": message, "type": "invalid_request_error", "param": param, "code": code}


@pytest.mark.parametrize("fields", [
    {"input": "x" * 20}, {"response_format": "WAV"}, {"response_format": "pcm", "stream_format": "sse"},
    {"speed": 0.25}, {"speed": 4.0}, {"conversation": "c" * 128}, {"conversation": "a1.b:c_d-e"},
    {"voice": {"id": "default"}},
], ids=["input-at-the-limit", "format-any-case", "sse", "slowest", "fastest", "conversation-128",
        "conversation-punctuation", "voice-object"])  # fmt: skip
def test_a_request_at_each_limit_passes_the_checks(fields) -> None:  # noqa: ANN001
    """Accepted by the checks: what stops it is the model, still loading."""
    response = speak(client(), **fields)
    assert error_of(response, 503)["message"] == LOADING and response.headers["retry-after"] == "7"


def test_a_model_that_failed_to_load_says_why_on_every_request() -> None:
    c = client()
    c.app.state.companion.failure = "cannot load the model: OSError: no such file"
    err = error_of(speak(c), 503)
    assert err["message"] == "cannot load the model: OSError: no such file" and err["type"] == "server_error"
    health = c.get("/health")
    assert (health.status_code, health.json()) == (503, {"status": "failed"})


@pytest.mark.parametrize("method", ["get", "delete"])
def test_a_conversation_route_checks_the_name_then_needs_the_model(method: str) -> None:
    c = client()
    err = error_of(getattr(c, method)("/v1/conversations/-bad"), 400)
    assert (err["message"], err["param"]) == (BAD_CONVERSATION, "conversation")
    assert error_of(getattr(c, method)("/v1/conversations/good-one"), 503)["message"] == LOADING


# ---- keys ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("header", [None, "Bearer wrong", "Basic sekret", "sekret", "Bearer"])
def test_a_missing_or_wrong_key_is_a_401(header: str | None) -> None:
    headers = {"Authorization": header} if header is not None else {}
    c = client(api_key="sekret")
    for response in (c.get("/v1/models", headers=headers), c.get("/metrics", headers=headers),
                     c.get("/v1/audio/voices", headers=headers), speak(c, conversation="mine") if not headers else
                     c.post("/v1/audio/speech", headers=headers, json={"input": "Hi.", "voice": "default"})):
        err = error_of(response, 401)
        assert err == {"message": BAD_KEY, "type": "authentication_error", "param": None, "code": "invalid_api_key"}
        assert response.headers["www-authenticate"] == "Bearer"


@pytest.mark.parametrize("header", ["Bearer sekret", "bearer sekret", "BEARER  sekret  "])
def test_the_right_key_in_any_case_of_bearer_is_let_in(header: str) -> None:
    c = client(api_key="sekret")
    models = c.get("/v1/models", headers={"Authorization": header})
    assert models.status_code == 200
    assert models.json() == {"object": "list", "data": [{"id": "my-csm", "object": "model", "created": 0,
                                                        "owned_by": "companion"}]}  # fmt: skip
    metrics = c.get("/metrics", headers={"Authorization": header})
    assert metrics.status_code == 200 and metrics.headers["content-type"] == "text/plain; version=0.0.4; charset=utf-8"
    assert "companion_queue_depth 0" in metrics.text.splitlines()


def test_without_a_key_configured_every_route_is_open() -> None:
    c = client()
    assert c.get("/v1/models").status_code == 200 and c.get("/metrics").status_code == 200


def test_health_names_the_model_only_to_a_known_key() -> None:
    c = client(api_key="sekret")
    model = settings_for_test().model.id
    assert (c.get("/health").status_code, c.get("/health").json()) == (503, {"status": "loading"})
    assert c.get("/health", headers={"Authorization": "Bearer sekret"}).json() == {"status": "loading", "model": model}
    assert c.get("/health", headers={"Authorization": "Bearer nope"}).json() == {"status": "loading"}
    assert c.get("/health", headers={"Authorization": "Token sekret"}).json() == {"status": "loading"}
    c.app.state.companion.ready.set()
    ready = c.get("/health")
    assert (ready.status_code, ready.json()) == (200, {"status": "ready"})
    assert client().get("/health").json() == {"status": "loading"}  # no keys at all: the model is not named


# ---- voices -----------------------------------------------------------------------------------------


class State:
    """What the voice helpers read of the server's state."""

    def __init__(self, voices: Any) -> None:
        self.voices = voices


def voice_store(tmp: Path, data_dir: Path) -> VoiceStore:
    store = VoiceStore(shipped_dir=tmp / "none")
    shutil.copy(data_dir / "guest_16k.wav", tmp / "guest.wav")
    store.add(VoiceProfile(name="alice", audio=[str(tmp / "guest.wav"), str(tmp / "guest.wav")], transcript="Hi.", speaker=2))
    store.add(VoiceProfile(name="bob", speaker=1))
    store.add(VoiceProfile(name="carol", audio=[str(tmp / "gone.wav")], transcript="Gone."))
    return store


def test_the_voice_list_has_the_default_and_each_profile_with_its_reference_length(tmp_path: Path, data_dir: Path) -> None:
    import soundfile as sf

    state = State(voice_store(tmp_path, data_dir))
    seconds = round(2 * sf.info(str(data_dir / "guest_16k.wav")).duration, 2)
    assert seconds == 39.72  # hundredths: 39.716... rounded
    assert _voice_list(state) == [  # type: ignore[arg-type]
        {"id": "default", "name": "default", "speaker": 0, "reference_seconds": None},
        {"id": "alice", "name": "alice", "speaker": 2, "reference_seconds": seconds},
        {"id": "bob", "name": "bob", "speaker": 1, "reference_seconds": None},
        {"id": "carol", "name": "carol", "speaker": 0, "reference_seconds": None},  # its file is missing
    ]


def test_a_profile_named_default_replaces_the_built_in_one(tmp_path: Path) -> None:
    store = VoiceStore(shipped_dir=tmp_path / "none")
    store.add(VoiceProfile(name="default", speaker=3))
    assert _voice_list(State(store)) == [{"id": "default", "name": "default", "speaker": 3, "reference_seconds": None}]  # type: ignore[arg-type]


def test_an_unknown_voice_is_a_400_listing_each_voice_once(tmp_path: Path, data_dir: Path) -> None:
    state = State(voice_store(tmp_path, data_dir))
    for name in ("default", "alice", "bob"):
        assert _resolve_voice(state, name) == name  # type: ignore[arg-type]
    with pytest.raises(APIError) as raised:
        _resolve_voice(state, "../alice")  # type: ignore[arg-type]
    err = raised.value
    assert (err.status, err.param, err.code) == (400, "voice", "unknown_voice")
    assert err.message == "unknown voice '../alice': use one of default, alice, bob, carol (GET /v1/audio/voices lists them)"


def test_voice_profiles_that_cannot_be_read_are_a_500(tmp_path: Path) -> None:
    class Broken:
        def names(self) -> list[str]:
            raise CompanionError("voices.yaml: permission denied")

    with pytest.raises(APIError) as raised:
        _resolve_voice(State(Broken()), "alice")  # type: ignore[arg-type]
    assert (raised.value.status, raised.value.message) == (500, "cannot read the voice profiles: voices.yaml: permission denied")


def test_input_with_nothing_to_speak_is_a_400_and_a_clear_is_not(tmp_path: Path) -> None:
    state = State(VoiceStore(shipped_dir=tmp_path / "none"))
    _check_speech(state, "$CLEAR$")  # type: ignore[arg-type]
    _check_speech(state, "Hello.")  # type: ignore[arg-type]
    for text in ("... !!! ???", "🙂🙂"):
        with pytest.raises(APIError) as raised:
            _check_speech(state, text)  # type: ignore[arg-type]
        err = raised.value
        assert (err.status, err.param, err.code) == (400, "input", "no_speech")
        assert err.message == f"'input' has {NOTHING_TO_SAY.removeprefix('nothing to say in this text: ')}: give words"


# ---- what generation reports ------------------------------------------------------------------------


class Counting:
    def __init__(self) -> None:
        self.metrics = Metrics()


@pytest.mark.parametrize(("err", "status", "code", "message", "counted"), [
    (TextTooLong(900, 100), 400, "input_too_long", str(TextTooLong(900, 100)), 0),
    (CompanionError(NOTHING_TO_SAY), 400, "no_speech", NOTHING_TO_SAY, 0),
    (CompanionError("the reference could not be read"), 500, "generation_failed", "the reference could not be read", 1),
    (RuntimeError("CUDA out of memory"), 500, "generation_failed",
     "speech generation failed (RuntimeError: CUDA out of memory); the server keeps serving", 1),
], ids=["too-long", "nothing-to-say", "the-users-line", "a-bug"])  # fmt: skip
def test_what_generation_reports_becomes_its_answer(err, status, code, message, counted) -> None:  # noqa: ANN001
    state = Counting()
    answer = _generation_error(state, err)  # type: ignore[arg-type]
    assert (answer.status, answer.code, answer.message) == (status, code, message)
    assert answer.param == ("input" if status == 400 else None)
    assert state.metrics.errors["generation"] == counted


class Waiting:
    """A server state with a real worker and the settings."""

    def __init__(self, capacity: int, slots: int = 1) -> None:
        self.settings = settings_for_test()
        self.metrics = Metrics()
        self.worker = SpeechWorker(capacity, self.metrics, lambda: None, slots=slots)


class Request:
    """The one thing _start asks of a request: its next ASGI message (a hang-up when ``gone`` is set)."""

    def __init__(self) -> None:
        self.gone = asyncio.Event()

    async def receive(self) -> dict[str, Any]:
        await self.gone.wait()
        return {"type": "http.disconnect"}


def test_start_answers_a_full_queue_429_and_a_stopping_worker_503() -> None:
    state, release = Waiting(capacity=0), threading.Event()

    async def run() -> list[APIError]:
        loop = asyncio.get_running_loop()
        busy = Job(loop, action=lambda: release.wait(60))
        state.worker.submit(busy)
        errors = []
        for _ in range(2):
            try:
                await _start(state, Job(loop, action=lambda: "queued"), Request())  # type: ignore[arg-type]
            except APIError as err:
                errors.append(err)
            release.set()
            await asyncio.to_thread(state.worker.stop, 60)
        return errors

    full, stopping = asyncio.run(run())
    assert (full.status, full.code, full.headers) == (429, "queue_full", {"Retry-After": "7"})
    assert full.message == "the server is busy: every place in its queue is taken; retry later"
    assert (stopping.status, stopping.message) == (503, "the server is shutting down")


def test_start_gives_the_first_event_or_withdraws_a_job_whose_client_left() -> None:
    state, release = Waiting(capacity=1), threading.Event()

    async def run() -> tuple[Any, Job, bool]:
        loop = asyncio.get_running_loop()
        first = await _start(state, Job(loop, action=lambda: "done"), Request())  # type: ignore[arg-type]
        started = threading.Event()
        state.worker.submit(Job(loop, action=lambda: (started.set(), release.wait(60))))  # holds the one thread
        assert await asyncio.to_thread(started.wait, 60)
        leaving, request = Job(loop, action=lambda: "never"), Request()
        task = asyncio.ensure_future(_start(state, leaving, request))  # type: ignore[arg-type]
        await asyncio.sleep(0)
        request.gone.set()
        try:
            await task
            gone = False
        except ClientGone:
            gone = True
        release.set()
        return first, leaving, gone

    first, leaving, gone = asyncio.run(run())
    assert first == ("result", "done")
    assert gone and leaving.cancel.is_set() and state.worker.depth == 0 and state.metrics.disconnects == 1
    state.worker.stop(60)


# ---- the response body ------------------------------------------------------------------------------


class Stays:
    """A client that never leaves."""

    async def is_disconnected(self) -> bool:
        return False


def body(events: list[tuple[str, Any]], sse: bool, fmt: str = "pcm") -> tuple[list[Any], Job, Counting]:
    """The response body for a job whose worker produced ``events`` (the first handed over as ``first``);
    the request arrived when this is called."""
    state = Counting()
    received = time.perf_counter()

    async def run() -> tuple[list[Any], Job]:
        job = Job(asyncio.get_running_loop())
        for event in events[1:]:
            job.events.put_nowait(event)
        out: list[Any] = []
        try:
            async for data in _audio_events(state, job, Stays(), events[0], fmt, sse, received, 12):  # type: ignore[arg-type]
                out.append(data)
        except RuntimeError as err:
            out.append(err)
        return out, job

    out, job = asyncio.run(run())
    return out, job, state


def chunk(i: int) -> np.ndarray:
    return np.full(480, 0.1 * (i + 1), np.float32)


def sse_events(out: list[Any]) -> list[dict[str, Any]]:
    for data in out:
        assert data.startswith(b"data: ") and data.endswith(b"\n\n")
    return [json.loads(data[6:]) for data in out]


def test_sse_sends_each_chunk_then_the_usage() -> None:
    out, job, state = body([("audio", chunk(0)), ("audio", chunk(1)), ("end", None)], sse=True)
    assert sse_events(out) == [
        {"type": "speech.audio.delta", "audio": base64.b64encode(to_pcm16(chunk(0))).decode()},
        {"type": "speech.audio.delta", "audio": base64.b64encode(to_pcm16(chunk(1))).decode()},
        {"type": "speech.audio.done", "usage": {"input_tokens": 12, "output_tokens": 0, "total_tokens": 12}},
    ]
    assert job.finished and job.sent == 2 and not job.cancel.is_set()
    assert state.metrics.ttfb.count == 1 and state.metrics.disconnects == 0


def test_a_failure_after_audio_is_an_sse_error_event(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.ERROR, logger="companion.serve"):
        out, job, state = body([("audio", chunk(0)), ("error", ValueError("the engine broke")), ("end", None)], sse=True)
    assert sse_events(out)[1:] == [{"type": "error", "error": {"message": "speech generation failed: the engine broke",
                                                              "type": "server_error"}}]  # fmt: skip
    assert job.finished and state.metrics.errors["generation"] == 1 and state.metrics.disconnects == 0
    assert [r.getMessage() for r in caplog.records] == ["speech generation failed after audio was sent: the engine broke"]


def test_a_failure_after_audio_cuts_a_raw_stream() -> None:
    out, job, state = body([("audio", chunk(0)), ("error", ValueError("the engine broke")), ("end", None)], sse=False)
    assert out[0] == to_pcm16(chunk(0)) and isinstance(out[1], RuntimeError) and len(out) == 2
    assert str(out[1]) == "speech generation failed after audio was sent"
    assert job.finished and state.metrics.errors["generation"] == 1 and state.metrics.disconnects == 0


def test_an_empty_reply_sends_nothing_and_counts_no_first_byte() -> None:
    out, job, state = body([("end", None)], sse=False)
    assert out == [] and job.finished and state.metrics.ttfb.count == 0
    out, job, state = body([("end", None)], sse=True)
    assert sse_events(out) == [{"type": "speech.audio.done", "usage": {"input_tokens": 12, "output_tokens": 0,
                                                                       "total_tokens": 12}}]  # fmt: skip
    assert state.metrics.ttfb.count == 0


def test_a_wav_reply_counts_its_first_byte_once() -> None:
    start = time.perf_counter()
    out, job, state = body([("audio", chunk(0)), ("audio", chunk(1)), ("end", None)], sse=False, fmt="wav")
    took = time.perf_counter() - start
    assert b"".join(out).startswith(b"RIFF") and state.metrics.ttfb.count == 1 and job.sent == 2
    assert 0 <= state.metrics.ttfb.sum <= took  # from the request's arrival to its first bytes


def test_an_encoder_that_holds_audio_sends_it_at_the_end() -> None:
    audio = [np.sin(np.arange(24000, dtype=np.float32) * 0.05 * (i + 1)) * 0.3 for i in range(2)]
    encoder = make_encoder("mp3")
    expected = encoder.add(audio[0]) + encoder.add(audio[1]) + encoder.finish()
    out, _, _ = body([("audio", audio[0]), ("audio", audio[1]), ("end", None)], sse=False, fmt="mp3")
    assert b"".join(out) == expected


def test_a_voice_given_as_an_object_is_its_id() -> None:
    request = SpeechRequest(input="Hi.", voice={"id": "alice"}, response_format="FLAC")
    assert _check(request, settings_for_test()) == ("Hi.", "alice", "flac")


def test_docs_pages_are_not_served() -> None:
    c = client()
    for path in ("/docs", "/redoc", "/openapi.json"):
        assert c.get(path).status_code == 404


def test_cors_answers_only_the_configured_origins() -> None:
    settings = load_settings(overrides={"serve": {"cors_origins": ["https://app.example"]}})
    c = TestClient(create_app(settings), raise_server_exceptions=False)
    preflight = {"Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "x-custom"}
    ok = c.options("/v1/audio/speech", headers={"Origin": "https://app.example", **preflight})
    assert ok.status_code == 200 and ok.headers["access-control-allow-origin"] == "https://app.example"
    assert "POST" in ok.headers["access-control-allow-methods"] and ok.headers["access-control-allow-headers"] == "x-custom"
    other = c.options("/v1/audio/speech", headers={"Origin": "https://evil.example", **preflight})
    assert "access-control-allow-origin" not in other.headers


def test_a_model_that_cannot_load_is_reported_once_through_on_fatal(tmp_path: Path) -> None:
    settings = load_settings(overrides={"model": {"id": str(tmp_path / "no-model-here"), "device": "cpu"}})
    told: list[str] = []
    app = create_app(settings, on_fatal=told.append)
    with TestClient(app, raise_server_exceptions=False):
        pass  # the lifespan loads (and fails), then joins the loader
    state = app.state.companion
    assert state.failure is not None and told == [state.failure] and not state.ready.is_set()


def test_an_action_runs_after_its_conversations_earlier_jobs_and_reports_failures() -> None:
    state, release, ran = Waiting(capacity=2, slots=2), threading.Event(), []
    state.ready, state.failure = threading.Event(), None
    state.ready.set()

    async def run() -> tuple[Any, APIError]:
        loop = asyncio.get_running_loop()
        state.worker.submit(Job(loop, key=("", "c"), action=lambda: (release.wait(60), ran.append("first"))))
        later = asyncio.ensure_future(_act(state, Request(), lambda: ran.append("second") or "answer", ("", "c")))  # type: ignore[arg-type]
        while not (state.worker.generating >= 1 and state.worker.depth + state.worker.generating == 2):
            await asyncio.sleep(0.001)  # both accepted and the first running (counts, not a time)
        assert state.worker.depth == 1 and ran == []  # a thread is free, but its conversation is busy
        release.set()
        value = await later
        try:
            await _act(state, Request(), lambda: (_ for _ in ()).throw(CompanionError("it broke")), ("", "d"))  # type: ignore[arg-type]
        except APIError as err:
            return value, err
        raise AssertionError("no error")

    value, err = asyncio.run(run())
    state.worker.stop(60)
    assert value == "answer" and ran == ["first", "second"]
    assert (err.status, err.code, err.message) == (500, "generation_failed", "it broke")
    assert state.metrics.errors["generation"] == 1
