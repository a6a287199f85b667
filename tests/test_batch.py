"""`companion batch` through the real entry point, on the tiny checkpoint."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import soundfile as sf

from companion.paths import get_paths
from companion.store import Store
from companion.voices import VoiceProfile, VoiceStore

SCRIPT = """# a small play
Good morning.

guest16: Morning to you.
Yes. || No. || Sure.
$CLEAR$
guest16: Bye.
"""


def companion(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "companion", *args], capture_output=True, text=True,
                          env=os.environ.copy(), timeout=600)


@pytest.fixture
def setup(data_dir: Path) -> None:
    """Two voices and a config with short segments and a small context (so it runs in seconds)."""
    _setup(data_dir)


def _setup(data_dir: Path, more_config: str = "") -> None:
    """Two voices, short segments, a small context, no watermark (and ``more_config``, YAML)."""
    paths = get_paths()
    paths.config_dir.mkdir(parents=True, exist_ok=True)
    paths.config_file.write_text("generation:\n  max_segment_seconds: 1.2\ncontext:\n  max_seq_len: 1536\n"
                                 "watermark:\n  enabled: false\n" + more_config)
    voices = VoiceStore()
    for name, audio in (("guest", "guest.mp3"), ("guest16", "guest_16k.wav")):
        voices.add(VoiceProfile(name=name, audio=[str(data_dir / audio)], transcript_file=str(data_dir / "guest.txt")))


def test_batch_renders_numbered_files_and_the_conversation(setup: None, tiny_model_dir: Path, tmp_path: Path) -> None:
    script = tmp_path / "play.txt"
    script.write_text(SCRIPT)
    out = tmp_path / "out"
    result = companion("batch", str(script), "-o", str(out), "--model", str(tiny_model_dir), "--voice", "guest", "--seed", "1")
    assert result.returncode == 0, result.stderr
    assert "rendering" in result.stderr  # the progress bar
    names = sorted(p.name for p in out.glob("*.wav"))
    assert names == ["001-guest.wav", "002-guest16.wav", "003-guest+guest16.wav", "004-guest16.wav", "conversation.wav"]
    lengths = {}
    for name in names:
        info = sf.info(str(out / name))
        assert info.samplerate == 24000 and info.channels == 1 and info.frames > 0
        lengths[name] = info.frames
    lines_total = sum(n for name, n in lengths.items() if name != "conversation.wav")
    assert lengths["conversation.wav"] > lines_total  # every line, plus the gaps between utterances
    assert "history conversation 1" in result.stdout
    with Store() as store:
        turns = store.turns(1)
        assert [t.voice for t in turns][-4:] == ["guest", "guest16", "guest", "guest16"]
        assert turns[-1].text == "Bye." and store.session(1).context_start == turns[-1].seq  # $CLEAR$ recorded


def test_batch_without_history(setup: None, tiny_model_dir: Path, tmp_path: Path) -> None:
    script = tmp_path / "one.txt"
    script.write_text("Hi.\n")
    result = companion("batch", str(script), "-o", str(tmp_path / "o"), "--model", str(tiny_model_dir),
                       "--voice", "guest", "--no-history")
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "o" / "001-guest.wav").exists()
    assert not get_paths().history_db.exists()


@pytest.mark.parametrize(
    ("content", "extra", "message"),
    [
        (None, [], "script not found: check the path"),
        ("# only a comment\n\n", [], "no lines to speak"),
        ("Hi.\n", ["--voice", "nobody"], "unknown voice 'nobody'"),
    ],
)
def test_batch_errors_are_one_line(setup: None, tiny_model_dir: Path, tmp_path: Path, content: str | None,
                                   extra: list[str], message: str) -> None:
    script = tmp_path / "s.txt"
    if content is not None:
        script.write_text(content)
    result = companion("batch", str(script), "-o", str(tmp_path / "o"), "--model", str(tiny_model_dir), *extra)
    assert result.returncode == 1
    errors = [ln for ln in result.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and message in errors[0], result.stderr
    assert "Traceback" not in result.stderr


PLAY = """Good morning.
guest16: Morning to you.
How did you sleep?
guest16: Not well, the neighbours had a party.
Yes. || No. || Sure.
$CLEAR$
guest16: Bye.
Bye then.
"""


def _manifest(out: Path) -> dict:
    return json.loads((out / "manifest.json").read_text(encoding="utf-8"))


def _times(out: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in sorted(out.rglob("*")) if p.is_file()}


def _hears_ctrl_c() -> None:
    """In the child: Ctrl-C's default, even when the tests run as a background job (a shell starts
    those with SIGINT ignored, and Python then never installs its KeyboardInterrupt handler)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _interrupted(argv: list[str], out: Path, sig: signal.Signals) -> tuple[int, str, dict]:
    """Start a batch, and once its manifest shows two lines done, send ``sig``; (exit code, stderr, manifest)."""
    proc = subprocess.Popen([sys.executable, "-m", "companion", *argv], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=os.environ.copy(), preexec_fn=_hears_ctrl_c)
    try:
        while proc.poll() is None:
            try:
                done = [e for e in _manifest(out)["lines"] if e["done"] and not e["clear"]]
            except (OSError, ValueError):  # not written yet (it is written atomically: never half)
                done = []
            if len(done) >= 2:
                proc.send_signal(sig)
                break
            time.sleep(0.02)
        _, err = proc.communicate(timeout=600)
    finally:
        if proc.poll() is None:
            proc.kill()
    return proc.returncode, err, _manifest(out)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory, data_dir: Path, tiny_model_dir: Path) -> Path:
    """PLAY rendered once, uninterrupted, in a home of its own (the kill tests start from a copy of it)."""
    base = tmp_path_factory.mktemp("uninterrupted")
    (base / "play.txt").write_text(PLAY)
    with pytest.MonkeyPatch.context() as env:
        env.setenv("COMPANION_HOME", str(base / "companion_home"))
        env.setenv("HOME", str(base / "home"))
        _setup(data_dir)
        first = companion("batch", str(base / "play.txt"), "--model", str(tiny_model_dir), "--voice", "guest",
                          "--seed", "3", "-o", str(base / "whole"))
    assert first.returncode == 0, first.stderr
    return base


@pytest.mark.xdist_group("batch-uninterrupted")  # one worker renders it once for both
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGKILL], ids=["ctrl-c", "kill"])
def test_a_killed_batch_resumes_where_it_stopped_and_ends_as_an_uninterrupted_one(
        uninterrupted: Path, companion_home: Path, tiny_model_dir: Path, tmp_path: Path, sig: signal.Signals) -> None:
    # This test's home and folder are those the uninterrupted run left (copied, times kept): as if it ran here.
    shutil.copytree(uninterrupted / "companion_home", companion_home, dirs_exist_ok=True)
    shutil.copytree(uninterrupted / "whole", tmp_path / "whole")
    script = uninterrupted / "play.txt"
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    args = [str(script), "--model", str(tiny_model_dir), "--voice", "guest", "--seed", "3"]

    manifest = _manifest(whole)
    lines = manifest["lines"]
    assert manifest["complete"] and manifest["conversation"] == "conversation.wav"
    assert [e["text"] for e in lines] == [ln for ln in PLAY.splitlines() if ln]  # every line, as written
    assert [e["line"] for e in lines] == list(range(1, 9)) and [e["index"] for e in lines] == list(range(1, 9))
    assert lines[1]["spoken"] == "Morning to you." and lines[1]["voice"] == "guest16" and lines[4]["voice"] == "guest+guest16"
    assert all(e["done"] and e["seed"] == 3 and (whole / e["file"]).is_file() and e["seconds"] > 0
               for e in lines if not e["clear"])
    assert len({e["hash"] for e in lines}) == 8 and lines[5]["clear"] and lines[5]["file"] is None

    before, sessions = _times(whole), len(Store().sessions())
    again = companion("batch", *args, "-o", str(whole))
    assert again.returncode == 0, again.stderr
    assert again.stdout.strip() == f"nothing to render: all 8 lines in {whole} are up to date (skipped 8)"
    assert _times(whole) == before and len(Store().sessions()) == sessions  # nothing written, no history entry

    code, err, stopped = _interrupted(["batch", *args, "-o", str(cut)], cut, sig)
    assert code == (130 if sig == signal.SIGINT else -signal.SIGKILL), err
    done = [e for e in stopped["lines"] if e["done"]]
    assert not stopped["complete"] and 2 <= len([e for e in done if not e["clear"]]) < 7
    assert all((cut / e["file"]).is_file() for e in done if not e["clear"])  # the manifest claims no missing file
    if sig == signal.SIGINT:
        assert f"interrupted: {len([e for e in done if not e['clear']])} of 7 lines are rendered" in err
    kept = _times(cut)
    with Store() as store:
        sessions = {s.id: s.turn_count for s in store.sessions()}
    assert stopped["history"] in sessions and sessions[stopped["history"]] >= 2  # the cut run's entry

    resumed = companion("batch", *args, "-o", str(cut))
    assert resumed.returncode == 0, resumed.stderr
    with Store() as store:  # the resumed run's entry replaces the cut one's: one conversation, every line
        after = {s.id: s.turn_count for s in store.sessions()}
    assert set(after) == set(sessions) - {stopped["history"]} | {_manifest(cut)["history"]}
    assert after[_manifest(cut)["history"]] == after[_manifest(whole)["history"]]
    assert f"skipped {len(done)} lines already rendered" in resumed.stderr
    assert f"wrote {7 - len([e for e in done if not e['clear']])} lines (skipped {len(done)} already rendered)" in resumed.stdout
    for e in done:
        if not e["clear"]:
            assert _times(cut)[e["file"]] == kept[e["file"]]  # not rendered again
    assert _manifest(cut)["lines"] == lines  # the same files, voices, seconds, hashes
    for name in ["conversation.wav", *(e["file"] for e in lines if e["file"])]:
        assert (cut / name).read_bytes() == (whole / name).read_bytes(), name


def test_a_changed_line_renders_it_and_what_follows_and_drops_old_files(setup: None, tiny_model_dir: Path,
                                                                         tmp_path: Path) -> None:
    script, out = tmp_path / "s.txt", tmp_path / "out"
    script.write_text("One.\nTwo.\nThree.\n")
    args = ["batch", str(script), "-o", str(out), "--model", str(tiny_model_dir), "--voice", "guest", "--seed", "1",
            "--no-history"]
    assert companion(*args).returncode == 0
    before = _times(out)
    script.write_text("One.\nTwo, changed.\n")
    result = companion(*args)
    assert result.returncode == 0, result.stderr
    assert "wrote 1 lines (skipped 1 already rendered)" in result.stdout
    after = _times(out)
    assert after["001-guest.wav"] == before["001-guest.wav"] and after["002-guest.wav"] != before["002-guest.wav"]
    assert "003-guest.wav" not in after and "003.safetensors" not in after  # the longer run's files are gone
    assert [e["text"] for e in _manifest(out)["lines"]] == ["One.", "Two, changed."]


@pytest.mark.parametrize(
    ("content", "extra", "message"),
    [
        ("Hi.\nnosuch: hello\n", [], "s.txt, line 2: 'nosuch' is not a voice (voices: guest, guest16, narrator, default): "
                                     "fix the name, or write \\nosuch: to speak it as written"),
        ("Hi.\nguest || nosuch : hello\n", [], "s.txt, line 2: 'nosuch' is not a voice"),
        (b"\x00\x01binary\xff", [], "s.txt: script is not UTF-8 text: save it as UTF-8"),
        (b"ab\x00cd\n", [], "s.txt: script is not a text file (it holds binary data)"),
        ("", [], "s.txt: the script has no lines to speak"),
        ("$CLEAR$\n", [], "s.txt: the script has no lines to speak"),
    ],
)
def test_script_errors_come_before_any_model_work(tmp_path: Path, setup: None, content: str | bytes,
                                                  extra: list[str], message: str) -> None:
    script = tmp_path / "s.txt"
    script.write_bytes(content if isinstance(content, bytes) else content.encode())
    out = tmp_path / "o"
    result = companion("batch", str(script), "-o", str(out), "--model", "no-model-here", *extra)
    assert result.returncode == 1
    assert result.stderr.strip() == f"error: {script.parent}/{message}" or (
        result.stderr.startswith(f"error: {script.parent}/{message}") and len(result.stderr.strip().splitlines()) == 1
    ), result.stderr
    assert not out.exists()  # refused before the folder was made or the model looked for


def test_the_escape_and_paragraphs(setup: None) -> None:
    from companion.session.script import parse_line, script_lines, unknown_prefix

    assert unknown_prefix("\\nosuch: hello", ["guest"]) is None and unknown_prefix("Note: milk", []) == "Note"
    assert unknown_prefix("At 10:30 we go", []) is None and unknown_prefix("https://example.com", []) is None
    assert [(p.voice, p.text) for p in parse_line("\\guest: hello", ["guest"])] == [(None, "guest: hello")]
    wrapped = "# intro\nIt was a dark\nand stormy night.\n\nguest: The rain\nfell.\n$CLEAR$\nEnd.\n"
    assert script_lines(wrapped, paragraphs=True) == [(2, "It was a dark and stormy night."), (5, "guest: The rain fell."),
                                                      (7, "$CLEAR$"), (8, "End.")]
    assert script_lines(wrapped) == [(2, "It was a dark"), (3, "and stormy night."), (5, "guest: The rain"),
                                     (6, "fell."), (7, "$CLEAR$"), (8, "End.")]


def test_a_folder_batch_did_not_write_is_refused_unless_forced(setup: None, tmp_path: Path) -> None:
    script, out = tmp_path / "s.txt", tmp_path / "photos"
    script.write_text("Hi.\n")
    out.mkdir()
    (out / "holiday.jpg").write_bytes(b"\xff\xd8")
    refused = companion("batch", str(script), "-o", str(out), "--model", "no-model-here")
    assert refused.returncode == 1 and refused.stderr.strip() == (
        f"error: {out}: this folder has files that batch did not write: choose a new or empty -o DIR, "
        "or pass --force to write into it")
    forced = companion("batch", str(script), "-o", str(out), "--model", "no-model-here", "--force")
    assert forced.returncode == 1 and "batch did not write" not in forced.stderr  # it went on, to the (missing) model
    assert (out / "holiday.jpg").exists()
