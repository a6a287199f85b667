"""Voice profiles: the YAML schema, its one-line errors, and the store (user profiles over shipped ones)."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from companion.audio.prepare import prepare_references
from companion.config import ReferenceSettings
from companion.errors import CompanionError
from companion.paths import get_paths, shipped_clone_dir
from companion.voices import VoiceProfile, VoiceStore


def write_profile(text: str, name: str = "bob.yaml") -> Path:
    folder = get_paths().voices_dir
    folder.mkdir(parents=True, exist_ok=True)
    (folder / name).write_text(text, encoding="utf-8")
    return folder / name


GOOD = "name: bob\nspeaker: 1\naudio: narrator.mp3\ntranscript: Hello there.\n"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("name: bob\naudio: [a.wav\ntranscript: hi\n", "YAML syntax error at line 3"),
        ("name: bob\nspeeker: 1\n", "unknown key 'speeker' (line 2): remove it or check its spelling"),
        ("name: bob\nspeaker: two\n", "key 'speaker' (line 2): should be a whole number"),
        ("name: bob\nspeaker: -1\n", "key 'speaker' (line 2): should be greater than or equal to 0"),
        ("name: bob\ngeneration:\n  topk: many\n", "key 'generation.topk' (line 3): should be a whole number"),
        ("name: bob\ngeneration:\n  temprature: 0.5\n", "unknown key 'generation.temprature' (line 3)"),
        ("name: bob\naudio: 3\n", "key 'audio' (line 2): expected a file path or a list of file paths"),
        ("name: bob\naudio: [a.wav, {x: 1}]\n", "key 'audio' (line 2): expected a file path or a list of file paths"),
        ("speaker: 1\n", "missing key 'name': add it"),
        ("name: bob smith\n", "key 'name' (line 1): 'bob smith' is not a valid voice name"),
        ("name: bob\naudio: a.wav\n", "transcript missing: add 'transcript: <the words spoken>' or 'transcript_file: FILE'"),
        ("name: bob\naudio: a.wav\ntranscript: '  '\n", "key 'transcript' (line 3): is empty: write the words spoken"),
        ("name: bob\ntranscript: hi\ntranscript_file: t.txt\n", "both 'transcript' and 'transcript_file' are set: keep one"),
        ("", "file is empty: fill it in"),
        ("- name: bob\n", "expected a mapping of keys to values at the top level"),
    ],
)
def test_invalid_profiles_give_one_line_errors(text: str, expected: str) -> None:
    path = write_profile(text)
    store = VoiceStore()
    assert store.names() == ["narrator"]  # the others keep working
    [broken] = store.broken()
    with pytest.raises(CompanionError) as err:
        store.get("bob")  # using it gives its error
    message = str(err.value)
    assert message == broken.error and broken.path == path
    assert message.startswith(f"{path}: ") and expected in message and "\n" not in message


def test_duplicate_names_in_two_files() -> None:
    write_profile("name: bob\n", "a.yaml")
    second = write_profile("name: bob\nspeaker: 2\n", "b.yaml")
    store = VoiceStore()
    assert store.get("bob").speaker == 0  # the first file counts
    [broken] = store.broken()
    assert re.match(rf"^{second}: duplicate voice name 'bob' \(also in .*a.yaml\): rename one", broken.error)


def test_good_profile_loads_and_resolves_paths(data_dir: Path) -> None:
    write_profile(GOOD)
    profile = VoiceStore().get("bob")
    assert (profile.name, profile.speaker, profile.audio, profile.transcript_text()) == (
        "bob", 1, ["narrator.mp3"], "Hello there."
    )
    assert profile.audio_paths() == [shipped_clone_dir() / "narrator.mp3"]  # falls back to the shipped clone_files
    user_clone = get_paths().clone_dir
    user_clone.mkdir(parents=True)
    shutil.copy(data_dir / "guest.mp3", user_clone / "narrator.mp3")
    assert profile.audio_paths() == [user_clone / "narrator.mp3"]  # the user's clone_files come first
    shutil.copy(data_dir / "guest.mp3", get_paths().voices_dir / "narrator.mp3")
    assert profile.audio_paths() == [get_paths().voices_dir / "narrator.mp3"]  # then the profile's own folder


def test_missing_audio_and_transcript_files_are_named() -> None:
    write_profile("name: bob\naudio: [gone.wav]\ntranscript_file: gone.txt\n")
    profile = VoiceStore().get("bob")
    with pytest.raises(CompanionError, match=r"bob.yaml: file 'gone.wav' not found \(looked in .*\): fix the path"):
        profile.audio_paths()
    with pytest.raises(CompanionError, match=r"file 'gone.txt' not found"):
        profile.transcript_text()
    (get_paths().voices_dir / "gone.txt").write_text(" \n", encoding="utf-8")
    with pytest.raises(CompanionError, match=r"gone.txt: transcript file is empty: write the words"):
        profile.transcript_text()


def test_shipped_example_is_listed_and_valid() -> None:
    (narrator,) = [p for p in VoiceStore().list() if p.name == "narrator"]
    assert not VoiceStore().is_user(narrator)
    assert narrator.audio_paths() == [shipped_clone_dir() / "narrator.mp3"]
    transcript = narrator.transcript_text()
    assert transcript is not None and transcript.startswith("Good evening")


def test_user_profile_wins_over_shipped_one() -> None:
    write_profile("name: narrator\nspeaker: 4\n", "mine.yaml")
    store = VoiceStore()
    assert [p.name for p in store.list()].count("narrator") == 1
    assert store.get("narrator").speaker == 4 and store.is_user(store.get("narrator"))


def test_add_save_and_remove_round_trip(data_dir: Path) -> None:
    store = VoiceStore()
    profile = VoiceProfile(
        name="guest", audio=[str(data_dir / "guest.mp3"), str(data_dir / "guest_16k.wav")],
        transcript_file=str(data_dir / "guest.txt"), speaker=2, generation={"topk": 20},
    )
    path = store.add(profile)
    assert path == get_paths().voices_dir / "guest.yaml"
    loaded = store.get("guest")
    assert loaded.model_dump() == profile.model_dump() and loaded.path == path
    with pytest.raises(CompanionError, match=r"^voice 'guest' already exists \(.*guest.yaml\): choose another name or pass --force"):
        store.add(profile)
    store.add(profile.model_copy(update={"speaker": 3}), force=True)
    assert store.get("guest").speaker == 3
    assert store.remove("guest") == path and not path.exists()
    with pytest.raises(CompanionError, match=r"^unknown voice 'guest' \(voices: narrator\): add it with"):
        store.remove("guest")
    with pytest.raises(CompanionError, match="is a shipped example .* cannot be removed"):
        store.remove("narrator")
    assert list(get_paths().voices_dir.iterdir()) == []  # no temporary files left


def test_attach_generated_reference(data_dir: Path) -> None:
    store = VoiceStore()
    store.add(VoiceProfile(name="fresh", speaker=1))
    assert store.get("fresh").transcript_text() is None and store.get("fresh").audio == []
    generated, _ = sf.read(str(data_dir / "guest.mp3"), dtype="float32")  # stands in for a generated reply (24 kHz)
    updated = store.attach_reference(store.get("fresh"), generated, "Honestly, I had a long day.")
    folder = get_paths().voices_dir
    assert sorted(p.name for p in folder.iterdir()) == ["fresh.wav", "fresh.yaml"]
    again = store.get("fresh")
    assert again.audio == ["fresh.wav"] and again.transcript == "Honestly, I had a long day." and again.speaker == 1
    assert updated.audio_paths() == again.audio_paths() == [folder / "fresh.wav"]
    written, rate = sf.read(str(folder / "fresh.wav"), dtype="float32")
    assert rate == 24000 and np.allclose(written, generated, atol=1e-3)
    prepared = prepare_references(again.audio_paths(), ReferenceSettings())
    assert prepared.reports[0].seconds_out > 15


def test_saving_a_shipped_profile_copies_it_with_working_paths(tmp_path: Path, data_dir: Path) -> None:
    shipped = tmp_path / "shipped_voices"
    shipped.mkdir()
    shutil.copy(data_dir / "guest_16k.wav", shipped / "take.wav")
    (shipped / "demo.yaml").write_text("name: demo\naudio: take.wav\ntranscript: hi\n", encoding="utf-8")
    store = VoiceStore(shipped_dir=shipped)
    profile = store.get("demo")
    profile.speaker = 5
    target = store.save(profile)
    assert target == get_paths().voices_dir / "demo.yaml" and (shipped / "demo.yaml").read_text().count("speaker") == 0
    copy = store.get("demo")
    assert copy.speaker == 5 and store.is_user(copy)
    assert copy.audio_paths() == [(shipped / "take.wav").resolve()]
