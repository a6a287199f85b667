"""Several listeners at once (issue 21): with engine.max_batch N, up to N replies are spoken together.

The real server (uvicorn on a loopback port, the tiny checkpoint) and the official `openai` client.
Order is forced by the speech worker's own locks, never by timing: holding ``ending`` keeps every
reply from ending while its audio flows; holding ``gate`` pauses every speech thread at its next step.
"""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import openai
import pytest
from serve_helpers import LONG_INPUT, LiveServer, pcm_samples, read_all, serve_settings, wait_for

from companion.paths import get_paths
from companion.store import Store

# Audio generated together matches audio generated alone to 1e-4 (float32 rounding of the batched
# matrix products), plus one step of the 16-bit PCM the client receives.
TOLERANCE = 1e-4 + 1 / 32767
THREE = "First line here. Second line here. Third line here."


@pytest.fixture
def four(tiny_model_dir: Path) -> Iterator[LiveServer]:
    live = LiveServer(serve_settings(tiny_model_dir, max_batch=4, queue_size=4))
    try:
        yield live
    finally:
        live.stop()


def _listen(client: openai.OpenAI, who: int, text: str, events: list[tuple[str, int]], lock: threading.Lock,
            audio: dict[int, bytes | BaseException], conversation: str | None = None) -> None:
    """One listener: streams its reply, noting in ``events`` when its first bytes came and when it ended."""
    try:
        extra = {"conversation": conversation} if conversation else None
        with client.audio.speech.with_streaming_response.create(
            model="csm-1b", voice="default", input=text, response_format="pcm", extra_body=extra
        ) as response:
            pieces = []
            for piece in response.iter_bytes():
                if piece and not pieces:
                    with lock:
                        events.append(("first", who))
                pieces.append(piece)
        with lock:
            events.append(("end", who))
        audio[who] = b"".join(pieces)
    except BaseException as err:  # noqa: BLE001 - checked by the test
        audio[who] = err


def _close(a: np.ndarray, b: np.ndarray) -> bool:
    return a.shape == b.shape and bool(np.abs(a - b).max() <= TOLERANCE)


def test_four_listeners_hear_their_first_audio_before_any_reply_ends(four: LiveServer) -> None:
    """Acceptance: with engine.max_batch 4, four clients started together each receive their first audio
    before any of the four replies has ended. No reply can end while ``ending`` is held; a server that
    speaks one reply at a time never gets the second listener its first audio then, and fails here."""
    client = four.openai()
    client.audio.speech.create(model="csm-1b", voice="default", input="Hi.", response_format="pcm")  # the reference
    worker = four.state.worker
    events: list[tuple[str, int]] = []
    lock = threading.Lock()
    audio: dict[int, bytes | BaseException] = {}
    threads = [threading.Thread(target=_listen, args=(client, i, LONG_INPUT, events, lock, audio)) for i in range(4)]
    with worker.ending:  # no reply can end until every listener has its first audio
        for t in threads:
            t.start()
        wait_for(lambda: len([e for e in list(events) if e[0] == "first"]) == 4, "all four listeners' first audio")
        assert [kind for kind, _ in events] == ["first"] * 4
        assert worker.generating == 4 and worker.depth == 0  # all four spoken together, none waiting
        assert four.metric("companion_streams_active") == 4 and four.metric("companion_streams_max") == 4
        assert four.metric("companion_batch_occupancy") == 1.0
    for t in threads:
        t.join(300)
    firsts = [i for kind, i in events[:4] if kind == "first"]
    ends = [i for kind, i in events[4:] if kind == "end"]
    assert sorted(firsts) == [0, 1, 2, 3] and sorted(ends) == [0, 1, 2, 3], events  # every first before any end
    replies = [pcm_samples(a) if isinstance(a, bytes) else a for a in (audio[i] for i in range(4))]
    assert all(isinstance(r, np.ndarray) and len(r) >= 10 * 1920 for r in replies), replies
    alone = pcm_samples(client.audio.speech.create(model="csm-1b", voice="default", input=LONG_INPUT,
                                                   response_format="pcm").content)
    assert all(_close(r, alone) for r in replies)  # the same request spoken alone sounds the same
    wait_for(lambda: four.metric("companion_streams_active") == 0, "the replies to be done")
    assert four.metric("companion_batch_occupancy") == 0.0


def test_a_conversation_speaks_in_order_while_others_speak_beside_it(tiny_model_dir: Path) -> None:
    """Two requests in one conversation run one after the other, in the order sent; a request of
    another conversation runs beside the first while the second waits, and the queue limit still holds."""
    live = LiveServer(serve_settings(tiny_model_dir, max_batch=3, queue_size=1))
    try:
        client = live.openai()
        client.audio.speech.create(model="csm-1b", voice="default", input="Hi.", response_format="pcm")
        worker = live.state.worker
        events: list[tuple[str, int]] = []
        lock = threading.Lock()
        audio: dict[int, bytes | BaseException] = {}
        texts = {0: "The kettle is on.", 1: "The tea is ready.", 2: "Out in the garden.", 3: "In the hall."}
        convs = {0: "kitchen", 1: "kitchen", 2: "garden", 3: "hall"}
        threads = {i: threading.Thread(target=_listen, args=(client, i, texts[i], events, lock, audio, convs[i]))
                   for i in texts}
        with worker.gate:
            threads[0].start()
            wait_for(lambda: worker.generating == 1, "the first kitchen request to start")
            threads[1].start()
            wait_for(lambda: worker.depth == 1, "the second kitchen request to wait")
            threads[2].start()
            wait_for(lambda: worker.generating == 2, "the garden request to start beside the first")
            assert worker.depth == 1  # a place is free, but the kitchen's second request waits for its first
            threads[3].start()
            wait_for(lambda: worker.generating == 3, "the hall request to take the free place")
            assert worker.depth == 1
            with pytest.raises(openai.RateLimitError):  # every place taken and one waits (queue_size 1): refused
                client.audio.speech.create(model="csm-1b", voice="default", input="One too many.",
                                           response_format="pcm", extra_body={"conversation": "porch"})
        for t in threads.values():
            t.join(300)
        assert all(isinstance(audio[i], bytes) and len(audio[i]) > 0 for i in texts), audio
        assert events.index(("end", 0)) < events.index(("first", 1))  # the kitchen's replies one after the other
        kitchen = live.http.get("/v1/conversations/kitchen").json()
        assert [t["text"] for t in kitchen["turns"]] == [texts[0], texts[1]]
        assert [t["text"] for t in live.http.get("/v1/conversations/garden").json()["turns"]] == [texts[2]]
        assert live.http.get("/v1/conversations/porch").status_code == 404  # refused: never started
    finally:
        live.stop()


def _kept(conversation: str) -> int:
    with Store(get_paths().history_db) as store:
        sid = store.conversation_session_id(conversation)
        return 0 if sid is None else len([t for t in store.turns(sid) if t.kind == "turn"])


def test_a_listener_hanging_up_mid_reply_leaves_the_other_three_untouched(four: LiveServer) -> None:
    """Three listeners stream while a fourth, in a conversation, hangs up in its reply's second sentence:
    the three hear exactly what they hear alone, and the conversation keeps the first sentence only."""
    client = four.openai()
    client.audio.speech.create(model="csm-1b", voice="default", input="Hi.", response_format="pcm")
    worker = four.state.worker
    texts = [LONG_INPUT, "A fox ran across the field. The farmer did not see it. The hens did.",
             "It rained all night. In the morning the river was high. Boats stayed at home."]
    alone = [pcm_samples(client.audio.speech.create(model="csm-1b", voice="default", input=t,
                                                    response_format="pcm").content) for t in texts]
    events: list[tuple[str, int]] = []
    lock = threading.Lock()
    audio: dict[int, bytes | BaseException] = {}
    threads = [threading.Thread(target=_listen, args=(client, i, t, events, lock, audio)) for i, t in enumerate(texts)]
    body = json.dumps({"model": "csm-1b", "voice": "default", "input": THREE, "response_format": "pcm",
                       "conversation": "cut"}).encode()
    received: list[bytes] = []
    with socket.create_connection(("127.0.0.1", four.port)) as raw:
        raw.sendall(b"POST /v1/audio/speech HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
                    b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        threading.Thread(target=read_all, args=(raw, received), daemon=True).start()
        for t in threads:
            t.start()
        wait_for(lambda: _kept("cut") == 1, "the first sentence to be sent and kept")
        worker.gate.acquire()  # every reply pauses at its next chunk; the fourth listener hangs up
        raw.shutdown(socket.SHUT_RDWR)
    try:
        wait_for(lambda: four.metric("companion_client_disconnects_total") == 1, "the server to see the hang-up")
    finally:
        worker.gate.release()
    for t in threads:
        t.join(300)
    wait_for(lambda: worker.generating == 0, "every reply to be done")
    assert four.metric("companion_generations_cancelled_total") == 1
    for i in range(3):
        heard = audio[i]
        assert isinstance(heard, bytes), heard
        assert _close(pcm_samples(heard), alone[i]), i
    shown = four.http.get("/v1/conversations/cut").json()
    assert [t["text"] for t in shown["turns"]] == ["First line here."] and _kept("cut") == 1
    again = four.http.post("/v1/audio/speech", json={"model": "csm-1b", "voice": "default", "input": "Fourth.",
                                                     "response_format": "pcm", "conversation": "cut"})
    assert again.status_code == 200 and len(pcm_samples(again.content)) > 0
    assert [t["text"] for t in four.http.get("/v1/conversations/cut").json()["turns"]] == ["First line here.", "Fourth."]


def test_a_conversation_in_use_is_neither_deleted_nor_dropped_to_make_room(tiny_model_dir: Path, data_dir: Path) -> None:
    """Two speech threads, interleaved here by hand: conversation 'a' is mid-reply when 'b' is made, with
    room for one conversation (in memory and in the history). 'a' is not deleted or dropped under its
    reply: both its sentences are kept; the limits apply once it is done."""
    from test_session import add_profile

    from companion.config import load_settings
    from companion.engine import Engine
    from companion.refcache import ReferenceCache
    from companion.server.conversations import Conversations

    engine = Engine.load(str(tiny_model_dir), device="cpu", dtype="float32", max_seq_len=512, max_batch=2)
    settings = load_settings(overrides={
        "generation": {"max_segment_seconds": 0.8, "seed": 1}, "context": {"max_seq_len": 512},
        "watermark": {"enabled": False}, "serve": {"max_conversations": 1, "live_conversations": 1}})
    with Store() as store:
        conversations = Conversations(engine, settings, store, add_profile(data_dir, "guest"), ReferenceCache())
        reply = conversations.speak("Yes. No.", "guest", "a", threading.Event())  # two sentences
        next(reply)  # 'a' is mid-reply (its first sentence)
        assert list(conversations.speak("Right.", "guest", "b", threading.Event()))  # one more than room for
        assert list(reply)
        described = conversations.describe("a")
        assert described is not None and [t["text"] for t in described["turns"]] == ["Yes.", "No."]
        assert sorted(name for name, _ in store.conversations("")) == ["a", "b"]  # both kept while 'a' spoke
        list(conversations.speak("Again.", "guest", "c", threading.Event()))  # now the limit applies
        assert [name for name, _ in store.conversations("")] == ["c"]
        assert list(conversations._live) == [("", "c")]
