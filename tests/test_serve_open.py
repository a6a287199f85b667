"""`companion serve` open to others (issue 20): named keys and their conversations, what a stopped
reply keeps, input with nothing to speak, the HTTP contract's corners. The real server on a loopback
port, the tiny checkpoint, the official `openai` client; generation is paused by holding the speech
worker's gate, never by timing."""

from __future__ import annotations

import json
import socket
import stat
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
from serve_helpers import LiveServer, pcm_samples, read_all, serve_settings, wait_for

from companion.paths import get_paths
from companion.server.keys import KeyStore
from companion.store import Store
from companion.text import prepare

THREE = "First line here. Second line here. Third line here."


@pytest.fixture
def server(tiny_model_dir: Path) -> Iterator[LiveServer]:
    live = LiveServer(serve_settings(tiny_model_dir, queue_size=3))
    try:
        yield live
    finally:
        live.stop()


def _bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def _speak(live: LiveServer, key: str | None, text: str, conversation: str | None = None) -> httpx.Response:
    body = {"model": "csm-1b", "voice": "default", "input": text, "response_format": "pcm"}
    if conversation:
        body["conversation"] = conversation
    return live.http.post("/v1/audio/speech", json=body, headers=_bearer(key) if key else None)


def _turns(live: LiveServer, key: str | None, conversation: str) -> list[str]:
    shown = live.http.get(f"/v1/conversations/{conversation}", headers=_bearer(key) if key else None)
    assert shown.status_code == 200, shown.text
    return [t["text"] for t in shown.json()["turns"]]


# ---- keys ------------------------------------------------------------------------------------------


def test_each_key_has_its_own_conversations_and_a_revoked_key_is_refused(tiny_model_dir: Path) -> None:
    keys = KeyStore()
    a, b = keys.add("alice"), keys.add("bob")
    live = LiveServer(serve_settings(tiny_model_dir), api_key="env-key-1234", keys=keys)
    try:
        assert _speak(live, a, "Hi.").status_code == 200  # the default voice's reference
        assert _speak(live, a, "Alice speaks first.", "c1").status_code == 200
        # The same id under another key is another conversation: B cannot see or clear A's.
        assert live.http.get("/v1/conversations/c1", headers=_bearer(b)).status_code == 404
        assert live.http.delete("/v1/conversations/c1", headers=_bearer(b)).status_code == 404
        assert _turns(live, a, "c1") == ["Alice speaks first."]
        assert _speak(live, b, "Bob has his own.", "c1").status_code == 200
        assert _turns(live, b, "c1") == ["Bob has his own."]
        assert live.http.delete("/v1/conversations/c1", headers=_bearer(b)).status_code == 200
        assert _turns(live, b, "c1") == []
        assert _turns(live, a, "c1") == ["Alice speaks first."]
        # COMPANION_API_KEY is one more key, with its own conversations.
        assert live.http.get("/v1/conversations/c1", headers=_bearer("env-key-1234")).status_code == 404
        # Revoked (by another process writing the file): refused at once, with WWW-Authenticate.
        KeyStore().revoke("bob")
        denied = live.http.get("/v1/conversations/c1", headers=_bearer(b))
        assert denied.status_code == 401 and denied.headers["www-authenticate"] == "Bearer"
        assert denied.json()["error"]["code"] == "invalid_api_key"
        assert live.http.get("/v1/models").headers["www-authenticate"] == "Bearer"
        assert _turns(live, a, "c1") == ["Alice speaks first."]
    finally:
        live.stop()
    text = keys.path.read_text(encoding="utf-8")
    assert a not in text and b not in text and a[8:40] not in text
    assert stat.S_IMODE(keys.path.stat().st_mode) == 0o600


def test_health_shows_the_model_only_to_a_key(tiny_model_dir: Path) -> None:
    keys = KeyStore()
    a = keys.add("probe")
    live = LiveServer(serve_settings(tiny_model_dir), keys=keys)
    try:
        assert live.http.get("/health").json() == {"status": "ready"}
        assert live.http.get("/health", headers=_bearer("wrong")).json() == {"status": "ready"}
        assert live.http.get("/health", headers=_bearer(a)).json() == {"status": "ready",
                                                                       "model": str(tiny_model_dir)}
    finally:
        live.stop()


def test_idle_conversations_are_deleted_and_each_key_has_at_most_the_limit(tiny_model_dir: Path) -> None:
    live = LiveServer(serve_settings(tiny_model_dir, max_conversations=2))
    try:
        for name in ("one", "two", "three"):
            assert _speak(live, None, f"Line for {name}.", name).status_code == 200
        # A third conversation deleted the one unused longest, with its turns.
        assert live.http.get("/v1/conversations/one").status_code == 404
        assert _turns(live, None, "two") == ["Line for two."]
        store = Store(get_paths().history_db)
        try:
            assert [name for name, _ in store.conversations("")] == ["three", "two"]  # "two" was just read
            with store.transaction() as db:  # "three" was last used 40 days ago
                db.execute("UPDATE sessions SET updated_at = '2000-01-01T00:00:00.000+00:00' "
                           "WHERE conversation = 'three'")
            assert live.state.conversations.sweep() == 1
            assert [name for name, _ in store.conversations("")] == ["two"]
            assert store.conversation_session_id("three") is None
        finally:
            store.close()
        assert live.http.get("/v1/conversations/three").status_code == 404
    finally:
        live.stop()


def test_key_command_adds_lists_and_revokes(companion_home: Path) -> None:
    import subprocess

    from terminal import COMPANION

    def key(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*COMPANION, "key", *args], capture_output=True, text=True, timeout=120)

    added = key("add", "laptop")
    assert added.returncode == 0, added.stderr
    new = added.stdout.strip().splitlines()[-1]
    assert new.startswith("csk-") and " " not in new and len(new) > 40
    assert KeyStore().match(new) is not None
    assert "laptop" in key("list").stdout and new not in key("list").stdout
    again = key("add", "laptop")
    assert again.returncode != 0 and "revoke it first" in again.stderr
    assert key("revoke", "laptop").returncode == 0
    assert KeyStore().match(new) is None
    missing = key("revoke", "laptop")
    assert missing.returncode != 0 and len(missing.stderr.strip().splitlines()) == 1
    bad = key("add", "no spaces")
    assert bad.returncode != 0 and "letters, digits" in bad.stderr


# ---- a stopped reply ---------------------------------------------------------------------------------


def _kept(conversation: str) -> int:
    store = Store(get_paths().history_db)
    try:
        sid = store.conversation_session_id(conversation)
        return 0 if sid is None else len([t for t in store.turns(sid) if t.kind == "turn"])
    finally:
        store.close()


def test_a_hang_up_in_segment_two_keeps_segment_one_only(server: LiveServer) -> None:
    assert prepare(THREE, 2.0) == ["First line here.", "Second line here.", "Third line here."]
    _speak(server, None, "Hi.")  # the default voice's reference
    worker = server.state.worker
    body = json.dumps({"model": "csm-1b", "voice": "default", "input": THREE, "response_format": "pcm",
                       "conversation": "cut"}).encode()
    received: list[bytes] = []
    with socket.create_connection(("127.0.0.1", server.port)) as raw:
        raw.sendall(b"POST /v1/audio/speech HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
                    b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        reader = threading.Thread(target=lambda: read_all(raw, received), daemon=True)  # a client that listens
        reader.start()
        wait_for(lambda: _kept("cut") == 1, "segment 1 to be sent and kept")
        # The worker's call that kept segment 1 went on to produce segment 2's first chunk: it is mid-segment.
        worker.gate.acquire()
        raw.shutdown(socket.SHUT_RDWR)
    try:
        wait_for(lambda: server.metric("companion_client_disconnects_total") == 1, "the server to see the hang-up")
    finally:
        worker.gate.release()
    wait_for(lambda: worker.generating == 0, "the engine to be free")
    assert server.metric("companion_generations_cancelled_total") == 1
    assert _turns(server, None, "cut") == ["First line here."]
    assert _kept("cut") == 1
    assert len(b"".join(received)) > 0


def test_a_segment_generated_but_not_sent_is_not_kept(server: LiveServer) -> None:
    """Segment 2 was generated to its end, but its audio had not all left when the client hung up."""
    import numpy as np

    _speak(server, None, "Hi.")
    state = server.state
    calls: list[int] = []

    def delivered() -> bool:  # the client got segment 1, and hung up before segment 2 was all sent
        calls.append(1)
        return len(calls) == 1

    def run() -> list[np.ndarray]:
        cancel = threading.Event()
        chunks = state.conversations.speak(THREE, "default", "held", cancel, delivered=delivered)
        out = []
        for chunk in chunks:
            out.append(chunk)
            if len(calls) == 2:
                cancel.set()  # as the server does when the client is gone
        return out

    with state.worker.gate:
        run()
    assert len(calls) == 2
    assert _turns(server, None, "held") == ["First line here."]
    # The next reply is spoken after segment 1 only, exactly as in a conversation that never had segment 2.
    again = _speak(server, None, "Fourth.", "held")
    assert again.status_code == 200 and len(pcm_samples(again.content)) > 0
    assert _turns(server, None, "held") == ["First line here.", "Fourth."]


# ---- errors ------------------------------------------------------------------------------------------


NOTHING = ["...", "😀🎉👍", "\x01\x02\x07", "\u200b\u200b", "-- !! ??", "narrator: ...", "... || 🙂", "default: 🙂"]


def test_nothing_to_speak_is_400_and_a_retrying_client_sends_it_once(server: LiveServer) -> None:
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=3, timeout=120)
    for text in NOTHING:
        with pytest.raises(openai.BadRequestError) as refused:
            client.audio.speech.create(model="csm-1b", voice="default", input=text, response_format="wav")
        body = refused.value.body
        assert body["code"] == "no_speech" and body["param"] == "input", (text, body)  # type: ignore[index]
        assert "\n" not in body["message"]  # type: ignore[index]
    text_metrics = server.http.get("/metrics").text
    assert f'companion_requests_total{{route="/v1/audio/speech",status="400"}} {len(NOTHING)}' in text_metrics
    assert 'kind="generation"' not in text_metrics and 'status="500"' not in text_metrics
    assert server.metric("companion_audio_chunks_total") == 0  # nothing reached the engine


def test_a_hang_up_before_the_first_audio_is_a_disconnect_not_an_error(server: LiveServer) -> None:
    _speak(server, None, "Hi.")
    worker = server.state.worker
    body = json.dumps({"model": "csm-1b", "voice": "default", "input": "Never heard.", "response_format": "pcm"})
    with worker.gate:  # the request reaches the engine, which is paused before its first chunk
        with socket.create_connection(("127.0.0.1", server.port)) as raw:
            raw.sendall(b"POST /v1/audio/speech HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
                        b"Content-Length: %d\r\n\r\n%s" % (len(body), body.encode()))
            wait_for(lambda: worker.generating == 1, "the request to reach the engine")
        wait_for(lambda: server.metric("companion_client_disconnects_total") == 1, "the server to see the hang-up")
    wait_for(lambda: worker.generating == 0, "the engine to be free")
    text = server.http.get("/metrics").text
    assert "status=\"500\"" not in text and "kind=\"generation\"" not in text and "kind=\"500\"" not in text
    assert 'companion_requests_total{route="/v1/audio/speech",status="499"} 1' in text


def _raw(port: int, head: bytes, body_parts: Iterator[bytes]) -> bytes:
    """Send ``head`` then the parts (as far as the server reads them); the server's whole answer."""
    with socket.create_connection(("127.0.0.1", port)) as raw:
        raw.settimeout(120)
        answer: list[bytes] = []

        def read() -> None:
            try:
                while data := raw.recv(65536):
                    answer.append(data)
            except OSError:
                pass

        reader = threading.Thread(target=read)
        reader.start()
        try:
            raw.sendall(head)
            for part in body_parts:
                raw.sendall(part)
        except OSError:  # the server answered and closed before the whole body was sent
            pass
        reader.join(120)
    return b"".join(answer)


def test_a_chunked_body_over_the_limit_is_413(server: LiveServer) -> None:
    def chunks() -> Iterator[bytes]:
        piece = b"x" * 65536
        for _ in range(200):  # 13 MB
            yield b"%x\r\n%s\r\n" % (len(piece), piece)
        yield b"0\r\n\r\n"

    head = b"POST /v1/audio/speech HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
    answer = _raw(server.port, head, chunks())
    assert answer.startswith(b"HTTP/1.1 413 "), answer[:200]
    assert b'"code":"body_too_large"' in answer.replace(b" ", b"")
    # Exactly at the limit is accepted (and judged as a body).
    at_limit = b'{"input": "' + b"a" * (65536 - 13) + b'"}'
    assert len(at_limit) == 65536
    ok = server.http.post("/v1/audio/speech", content=iter([at_limit]), headers={"content-type": "application/json"})
    assert ok.status_code == 400 and ok.json()["error"]["param"] in ("voice", "input")


def test_a_compressed_body_is_415(server: LiveServer) -> None:
    import gzip

    body = gzip.compress(json.dumps({"model": "m", "voice": "default", "input": "Hi."}).encode())
    refused = server.http.post("/v1/audio/speech", content=body,
                               headers={"content-type": "application/json", "content-encoding": "gzip"})
    assert refused.status_code == 415 and refused.json()["error"]["code"] == "unsupported_encoding"


def test_405_lists_every_method(server: LiveServer) -> None:
    refused = server.http.post("/v1/conversations/c1", json={})
    assert refused.status_code == 405
    assert {m.strip() for m in refused.headers["allow"].split(",")} >= {"GET", "DELETE"}
    assert "DELETE" in refused.json()["error"]["message"]
    assert server.http.put("/v1/audio/speech").headers["allow"] == "POST"


def test_unknown_voice_lists_each_voice_once_and_every_400_has_a_code(server: LiveServer) -> None:
    from companion.voices import VoiceProfile, VoiceStore

    VoiceStore().add(VoiceProfile(name="default"))  # a profile that takes the built-in name
    ok = {"model": "csm-1b", "input": "Hi.", "voice": "default"}
    message = server.http.post("/v1/audio/speech", json={**ok, "voice": "alloy"}).json()["error"]["message"]
    assert message.count("default") == 1, message
    for bad in ({"speed": 9}, {"stream_format": "ws"}, {"response_format": "aac"}, {"voice": "alloy"}, {"input": ""}):
        error = server.http.post("/v1/audio/speech", json={**ok, **bad}).json()["error"]
        assert error["code"], (bad, error)
