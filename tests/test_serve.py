"""`companion serve` end to end: the real server (uvicorn on an ephemeral loopback port, the tiny
checkpoint) and the official `openai` client. Generation is paused deterministically by holding the
speech worker's gate (the server's own pause between chunks), never by timing."""

from __future__ import annotations

import base64
import json
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
from serve_helpers import LONG_INPUT, LiveServer, decode, pcm_samples, serve_settings, wait_for

from companion.paths import get_paths
from companion.store import Store


@pytest.fixture
def server(tiny_model_dir: Path) -> Iterator[LiveServer]:
    live = LiveServer(serve_settings(tiny_model_dir, queue_size=3, max_input_chars=300))
    try:
        yield live
    finally:
        live.stop()


def test_wav_reply_decodes_at_24khz(server: LiveServer) -> None:
    client = server.openai()
    reply = client.audio.speech.create(model="csm-1b", voice="default", input="Hello there, friend.",
                                       response_format="wav")
    audio, rate = decode(reply.content)
    assert rate == 24000
    assert audio.ndim == 1 and len(audio) >= 1920 and abs(audio).max() > 0
    assert reply.response.headers["content-type"] == "audio/wav"
    for fmt in ("flac", "mp3", "opus"):
        other, other_rate = decode(client.audio.speech.create(model="csm-1b", voice="default", input="Hello again.",
                                                              response_format=fmt).content)
        assert other_rate == 24000 and len(other) > 0, fmt


def test_pcm_streams_before_the_reply_is_generated(server: LiveServer) -> None:
    client = server.openai()
    client.audio.speech.create(model="csm-1b", voice="default", input="Hi.", response_format="pcm")  # the voice's reference
    before = server.metric("companion_audio_chunks_total")
    with client.audio.speech.with_streaming_response.create(
        model="csm-1b", voice="default", input=LONG_INPUT, response_format="pcm"
    ) as response:
        pieces = response.iter_bytes()
        first = next(pieces)
        generated_at_first = server.metric("companion_audio_chunks_total") - before
        rest = b"".join(pieces)
    total = server.metric("companion_audio_chunks_total") - before
    assert first and generated_at_first < total, (generated_at_first, total)
    assert total >= 10  # several segments of 2, 4, 8, 10... frame chunks
    samples = pcm_samples(first + rest)
    assert len(samples) % 1920 == 0 and len(samples) >= total * 1920


def test_sse_events_parse(server: LiveServer) -> None:
    client = server.openai()
    events = []
    with client.audio.speech.with_streaming_response.create(
        model="csm-1b", voice="default", input="Good evening.", response_format="pcm", stream_format="sse"
    ) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        for line in response.iter_lines():
            if line.startswith("data: "):
                events.append(json.loads(line[len("data: "):]))
    kinds = [e["type"] for e in events]
    assert kinds[-1] == "speech.audio.done" and set(kinds[:-1]) == {"speech.audio.delta"} and len(kinds) >= 2
    audio = b"".join(base64.b64decode(e["audio"]) for e in events[:-1])
    assert len(pcm_samples(audio)) >= 1920
    assert events[-1]["usage"]["input_tokens"] > 0


def test_four_clients_served_a_fifth_gets_429(server: LiveServer) -> None:
    client = server.openai()
    client.audio.speech.create(model="csm-1b", voice="default", input="Hi.", response_format="wav")
    worker = server.state.worker
    results: dict[int, bytes | Exception] = {}

    def ask(i: int) -> None:
        try:
            results[i] = client.audio.speech.create(model="csm-1b", voice="default", input=f"Client {i} here.",
                                                    response_format="wav").content
        except Exception as err:  # noqa: BLE001 - checked below
            results[i] = err

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(4)]
    with worker.gate:  # the engine is paused: nothing finishes until it is released
        threads[0].start()
        wait_for(lambda: worker.generating == 1, "the first request to reach the engine")
        for t in threads[1:]:
            t.start()
        wait_for(lambda: worker.depth == 3, "three requests to wait in the queue")
        with pytest.raises(openai.RateLimitError) as refused:
            client.audio.speech.create(model="csm-1b", voice="default", input="One too many.", response_format="wav")
        assert refused.value.status_code == 429
        assert int(refused.value.response.headers["retry-after"]) >= 1
        assert refused.value.body["code"] == "queue_full"  # type: ignore[index]
    for t in threads:
        t.join(120)
    for i in range(4):
        data = results[i]
        assert isinstance(data, bytes), data
        audio, rate = decode(data)
        assert rate == 24000 and len(audio) >= 1920


def test_a_waiting_client_that_hangs_up_frees_its_place(server: LiveServer) -> None:
    client = server.openai()
    client.audio.speech.create(model="csm-1b", voice="default", input="Hi.", response_format="pcm")
    worker = server.state.worker
    done: list[bytes] = []
    first = threading.Thread(target=lambda: done.append(client.audio.speech.create(
        model="csm-1b", voice="default", input="First.", response_format="pcm").content))
    with worker.gate:
        first.start()
        wait_for(lambda: worker.generating == 1, "the first request to reach the engine")
        body = json.dumps({"model": "csm-1b", "voice": "default", "input": "Second.", "response_format": "pcm"}).encode()
        host, port = server.url.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port))) as raw:
            raw.sendall(b"POST /v1/audio/speech HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
                        b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
            wait_for(lambda: worker.depth == 1, "the second request to wait in the queue")
        wait_for(lambda: worker.depth == 0, "the hung-up request to leave the queue")
        assert server.metric("companion_client_disconnects_total") == 1  # counted before it leaves
    first.join(120)
    assert len(pcm_samples(done[0])) >= 1920
    assert server.metric("companion_generations_cancelled_total") == 0  # it never started


def test_hang_up_stops_the_generation(server: LiveServer) -> None:
    client = server.openai()
    client.audio.speech.create(model="csm-1b", voice="default", input="Hi.", response_format="pcm")
    worker = server.state.worker
    before = server.metric("companion_audio_chunks_total")
    with client.audio.speech.with_streaming_response.create(
        model="csm-1b", voice="default", input=LONG_INPUT, response_format="pcm"
    ) as response:
        next(response.iter_bytes())
        worker.gate.acquire()  # pause the engine between two chunks, then hang up
    try:
        wait_for(lambda: server.metric("companion_client_disconnects_total") == 1, "the server to see the hang-up")
    finally:
        worker.gate.release()
    wait_for(lambda: server.metric("companion_generations_cancelled_total") == 1, "the generation to stop")
    wait_for(lambda: worker.generating == 0, "the engine to be free")
    cut = server.metric("companion_audio_chunks_total") - before
    # The next request is served in full, and the whole reply has more chunks than the cut one had.
    full = client.audio.speech.create(model="csm-1b", voice="default", input=LONG_INPUT, response_format="pcm")
    whole = server.metric("companion_audio_chunks_total") - before - cut
    assert len(pcm_samples(full.content)) >= whole * 1920
    assert cut < whole, (cut, whole)
    assert server.metric("companion_generations_cancelled_total") == 1


def test_conversation_memory_and_delete(server: LiveServer) -> None:
    client = server.openai()
    client.audio.speech.create(model="csm-1b", voice="default", input="Hi.", response_format="wav")  # the reference
    say = lambda text: client.audio.speech.create(  # noqa: E731
        model="csm-1b", voice="default", input=text, response_format="wav", extra_body={"conversation": "kitchen"})
    say("Is the kettle on?")
    say("Yes, it is boiling.")
    store = Store(get_paths().history_db)
    try:
        sid = store.conversation_session_id("kitchen")
        assert sid is not None
        turns = [(t.seq, t.text) for t in store.turns(sid) if t.kind == "turn"]
        assert [text for _, text in turns] == ["Is the kettle on?", "Yes, it is boiling."]
        # The second turn was stored with the context still starting at the first: its prompt held it.
        assert store.session(sid).context_start == turns[0][0]
        shown = server.http.get("/v1/conversations/kitchen").json()
        assert [t["text"] for t in shown["turns"]] == ["Is the kettle on?", "Yes, it is boiling."]
        # A one-shot request in between is not part of the conversation.
        client.audio.speech.create(model="csm-1b", voice="default", input="Unrelated.", response_format="wav")
        cleared = server.http.delete("/v1/conversations/kitchen")
        assert cleared.status_code == 200 and cleared.json()["cleared"] is True
        assert server.http.get("/v1/conversations/kitchen").json()["turns"] == []
        say("Fresh start.")
        assert [t["text"] for t in server.http.get("/v1/conversations/kitchen").json()["turns"]] == ["Fresh start."]
        third = [t for t in store.turns(sid) if t.kind == "turn"][-1]
        assert store.session(sid).context_start == third.seq  # its prompt held no earlier turn
        say("$CLEAR$")  # as in chat
        assert server.http.get("/v1/conversations/kitchen").json()["turns"] == []
        missing = server.http.delete("/v1/conversations/nobody")
        assert missing.status_code == 404 and missing.json()["error"]["param"] == "conversation"
    finally:
        store.close()


def test_conversation_survives_a_restart(tiny_model_dir: Path) -> None:
    settings = serve_settings(tiny_model_dir)
    first = LiveServer(settings)
    try:
        client = first.openai()
        for text in ("Hi.", "Blue door."):
            client.audio.speech.create(model="csm-1b", voice="default", input=text, response_format="pcm",
                                       extra_body={"conversation": "door"} if text != "Hi." else None)
    finally:
        first.stop()
    second = LiveServer(settings)
    try:
        shown = second.http.get("/v1/conversations/door").json()
        assert [t["text"] for t in shown["turns"]] == ["Blue door."]
    finally:
        second.stop()


def test_api_key_required_when_configured(tiny_model_dir: Path) -> None:
    live = LiveServer(serve_settings(tiny_model_dir), api_key="s3cret-key")
    try:
        with pytest.raises(openai.AuthenticationError) as denied:
            live.openai("wrong").audio.speech.create(model="csm-1b", voice="default", input="Hi.", response_format="wav")
        assert denied.value.status_code == 401 and denied.value.body["code"] == "invalid_api_key"  # type: ignore[index]
        assert live.http.get("/metrics").status_code == 401
        assert live.http.get("/health").status_code == 200  # probes need no key
        reply = live.openai("s3cret-key").audio.speech.create(model="csm-1b", voice="default", input="Hi.",
                                                              response_format="wav")
        assert decode(reply.content)[1] == 24000
    finally:
        live.stop()


def test_models_and_voices_listed(server: LiveServer) -> None:
    client = server.openai()
    assert [m.id for m in client.models.list()] == ["csm-1b"]
    voices = server.http.get("/v1/audio/voices").json()["data"]
    by_name = {v["name"]: v for v in voices}
    assert by_name["default"]["reference_seconds"] is None  # no reference yet
    assert by_name["narrator"]["reference_seconds"] > 10  # the shipped example voice
    assert all(set(v) >= {"id", "name", "speaker", "reference_seconds"} for v in voices)


def _error(response: httpx.Response, status: int, param: str | None) -> str:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["param"] == param and error["message"] and "\n" not in error["message"]
    return str(error["message"])


def test_bad_requests_get_openai_errors(server: LiveServer) -> None:
    post = lambda body: server.http.post("/v1/audio/speech", json=body)  # noqa: E731
    ok = {"model": "csm-1b", "input": "Hi.", "voice": "default"}
    assert "empty" in _error(post({**ok, "input": "   "}), 400, "input")
    assert "limit is 300" in _error(post({**ok, "input": "word " * 100}), 400, "input")
    assert "unknown voice 'alloy'" in _error(post({**ok, "voice": "alloy"}), 400, "voice")
    assert "unknown voice" in _error(post({**ok, "voice": "../../etc/passwd"}), 400, "voice")
    assert "aac" in _error(post({**ok, "response_format": "aac"}), 400, "response_format")
    assert "stream_format" in _error(post({**ok, "stream_format": "ws"}), 400, "stream_format")
    assert "0.25" in _error(post({**ok, "speed": 9}), 400, "speed")
    assert "required" in _error(post({"voice": "default"}), 400, "input")
    assert "conversation" in _error(post({**ok, "conversation": "no spaces"}), 400, "conversation")
    bad_json = server.http.post("/v1/audio/speech", content=b"{not json", headers={"content-type": "application/json"})
    assert "JSON" in _error(bad_json, 400, None)
    huge = server.http.post("/v1/audio/speech", content=b"x" * 70000, headers={"content-type": "application/json"})
    assert "larger than" in _error(huge, 413, None)
    assert "no such endpoint" in _error(server.http.get("/v1/nothing"), 404, None)
    assert server.metric('companion_errors_total{kind="400"}') >= 10


def test_generation_failure_is_500_and_the_server_keeps_serving(server: LiveServer, data_dir: Path) -> None:
    """A voice whose cached reference holds codes the model cannot embed: the failure is inside generation."""
    import torch

    from companion.refcache import ReferenceCache
    from companion.voices import VoiceProfile, VoiceStore

    store = VoiceStore()
    store.add(VoiceProfile(name="broken", audio=[str(data_dir / "short.wav")], transcript="A short clip."))
    profile = store.get("broken")
    cache = ReferenceCache()
    engine = server.state.engine
    key = cache.key(profile.audio_paths(), server.state.settings.reference, engine.model_key, engine.codec_key)
    cache.put(key, torch.full((32, 12), 30000, dtype=torch.long))  # readable, but no such Mimi codes
    client = server.openai()
    with pytest.raises(openai.InternalServerError) as failed:
        client.audio.speech.create(model="csm-1b", voice="broken", input="This will fail.", response_format="wav")
    assert failed.value.status_code == 500 and failed.value.body["code"] == "generation_failed"  # type: ignore[index]
    assert "\n" not in failed.value.body["message"]  # type: ignore[index]
    reply = client.audio.speech.create(model="csm-1b", voice="default", input="Still here.", response_format="wav")
    assert decode(reply.content)[1] == 24000
    assert server.metric('companion_errors_total{kind="generation"}') == 1


def test_cors_headers_only_for_configured_origins(server: LiveServer, tiny_model_dir: Path) -> None:
    preflight = {"Origin": "https://chat.example", "Access-Control-Request-Method": "POST"}
    plain = server.http.options("/v1/audio/speech", headers=preflight)
    assert "access-control-allow-origin" not in plain.headers
    assert "access-control-allow-origin" not in server.http.get("/health", headers={"Origin": "https://chat.example"}).headers
    live = LiveServer(serve_settings(tiny_model_dir, cors_origins=["https://chat.example"]))
    try:
        allowed = live.http.options("/v1/audio/speech", headers=preflight)
        assert allowed.headers["access-control-allow-origin"] == "https://chat.example"
        other = live.http.options("/v1/audio/speech", headers={**preflight, "Origin": "https://evil.example"})
        assert "access-control-allow-origin" not in other.headers
    finally:
        live.stop()
