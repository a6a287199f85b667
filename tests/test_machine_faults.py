"""The user's own machine (issue 19, acceptance 1): a full disk, a read-only folder, no permission, a
broken pipe and stdin that is not UTF-8 each end in one line (or, for a broken pipe, quietly), never
"unexpected", with a non-zero exit; an output that cannot be written is refused before the model loads.

Everything runs the real binary in a subprocess against the real kernel: /dev/full and a small tmpfs
for ENOSPC, a read-only tmpfs (or, where mounting is not allowed, a read-only mount already there) for
EROFS, `setpriv` to an unprivileged user for EACCES (root ignores file permissions), a pipe whose
reader is already gone for EPIPE. A test that cannot get its condition skips and says why.
"""

from __future__ import annotations

import os
import random
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(__file__).parent / "data"
COMPANION = [sys.executable, "-m", "companion"]
NO_MODEL = "no-model-here"  # a row that answers about the output proves it was checked before any model work


def env(home: Path, **extra: str) -> dict[str, str]:
    e = dict(os.environ, COMPANION_HOME=str(home), PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1", **extra)
    e.pop("COMPANION_DEBUG", None)
    return e


def run(args: list[str], home: Path, cwd: Path, *, stdin: bytes = b"", stdout: int | None = subprocess.PIPE,
        prefix: list[str] | None = None) -> subprocess.CompletedProcess[bytes]:
    out = subprocess.run([*(prefix or []), *COMPANION, *args], input=stdin, stdout=stdout, stderr=subprocess.PIPE,
                         env=env(home), cwd=cwd, timeout=300)
    print(out.stdout, out.stderr.decode(errors="replace"), sep="\n")
    return out


def one_line(out: subprocess.CompletedProcess[bytes]) -> str:
    """The single stderr line of a failed command (asserting there is exactly one, and no "unexpected")."""
    lines = out.stderr.decode().strip().splitlines()
    assert out.returncode != 0
    assert len(lines) == 1, lines
    assert lines[0].startswith("error: ") and "unexpected" not in lines[0] and "Traceback" not in lines[0]
    return lines[0]


@pytest.fixture
def mount_point(tmp_path: Path) -> Iterator[Path]:
    """A folder for a tmpfs mount, unmounted afterwards."""
    where = tmp_path / "mnt"
    where.mkdir()
    yield where
    subprocess.run(["umount", str(where)], capture_output=True)


def _mount_tmpfs(where: Path, options: str) -> str | None:
    """Mount a tmpfs at ``where``; None on success, else why not (the caller skips with it)."""
    if shutil.which("mount") is None:
        return "no mount command"
    out = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(where)], capture_output=True, text=True)
    return None if out.returncode == 0 else f"cannot mount a tmpfs here ({out.stderr.strip() or out.returncode})"


def _fill(folder: Path) -> None:
    """Write until the filesystem is full (ENOSPC is the proof it is)."""
    with pytest.raises(OSError) as full, open(folder / "filler", "wb") as f:
        while True:
            f.write(b"\0" * 65536)
            f.flush()
    assert full.value.errno == 28


# ---- a full disk -------------------------------------------------------------------------------

@pytest.mark.parametrize("argv", [["history", "list"], ["voice", "list"], ["voice", "show", "narrator"]])
def test_output_to_a_full_disk_is_one_line(argv: list[str], tmp_path: Path, companion_home: Path) -> None:
    with open("/dev/full", "wb") as full:
        out = run(argv, companion_home, tmp_path, stdout=full.fileno())
    assert one_line(out) == "error: no space left on standard output: free some space or write somewhere else"


def test_a_full_folder_is_refused_before_the_model_and_a_write_into_it_is_one_line(
        mount_point: Path, tmp_path: Path, companion_home: Path) -> None:
    why = _mount_tmpfs(mount_point, "size=256k")
    if why:
        pytest.skip(why)
    _fill(mount_point)
    out = run(["say", "Hello there, how are you?", "-o", str(mount_point / "x.wav"), "--model", NO_MODEL],
              companion_home, tmp_path)
    assert one_line(out).startswith(f"error: no space left on {mount_point}: 0 kB free, about ")
    # the size cannot be estimated before a watermarked copy is made: the write itself meets ENOSPC
    out = run(["watermark", "embed", str(DATA / "guest.mp3"), str(mount_point / "marked.wav")], companion_home, tmp_path)
    assert one_line(out) == f"error: no space left on {mount_point}: free some space or write somewhere else"
    assert sorted(p.name for p in mount_point.iterdir()) == ["filler"]  # no temporary file left behind


# ---- a read-only folder ------------------------------------------------------------------------

def _read_only_folder(mount_point: Path) -> Path | None:
    """A folder on a read-only filesystem: a fresh read-only tmpfs, else a read-only mount already there."""
    if _mount_tmpfs(mount_point, "ro,size=64k") is None:
        return mount_point
    for line in Path("/proc/mounts").read_text().splitlines():
        fields = line.split()
        target = Path(fields[1].replace("\\040", " "))
        if "ro" in fields[3].split(",") and target.is_dir() and os.statvfs(target).f_flag & os.ST_RDONLY:
            return target
    return None


@pytest.mark.parametrize("command", ["say", "watermark", "batch"])
def test_a_read_only_folder_is_one_line_before_any_work(command: str, mount_point: Path, tmp_path: Path,
                                                        companion_home: Path) -> None:
    folder = _read_only_folder(mount_point)
    if folder is None:
        pytest.skip("no read-only filesystem: cannot mount one here and none is mounted")
    script = tmp_path / "lines.txt"
    script.write_text("Hello there.\n", encoding="utf-8")
    argv = {"say": ["say", "Hello.", "-o", str(folder / "x.wav"), "--model", NO_MODEL],
            "watermark": ["watermark", "embed", str(DATA / "guest.mp3"), str(folder / "x.wav")],
            "batch": ["batch", str(script), "-o", str(folder), "--model", NO_MODEL]}[command]
    out = run(argv, companion_home, tmp_path)
    assert one_line(out) == f"error: {folder} is read-only: write somewhere else"


# ---- no permission -----------------------------------------------------------------------------

def _as_nobody() -> list[str] | None:
    """The command prefix that runs as an unprivileged user (root ignores file permissions)."""
    if os.geteuid() != 0:
        return []  # already without CAP_DAC_OVERRIDE
    if shutil.which("setpriv") is None:
        return None
    return ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "--inh-caps=-all"]


def test_no_permission_is_one_line_before_the_model(companion_home: Path) -> None:
    prefix = _as_nobody()
    if prefix is None:
        pytest.skip("running as root without setpriv: cannot run as a user file permissions apply to")
    base = Path(tempfile.mkdtemp(prefix="companion-perm-"))  # /tmp, reachable by that user (tmp_path is not)
    try:
        base.chmod(0o755)
        home, work, locked = base / "home", base / "work", base / "locked"
        for d in (home, work):
            d.mkdir()
            d.chmod(0o777)
        locked.mkdir(mode=0o555)
        locked.chmod(0o555)
        check = subprocess.run([*prefix, *COMPANION, "--version"], capture_output=True, env=env(home), cwd=work)
        if check.returncode != 0:
            pytest.skip(f"the unprivileged user cannot run companion from this checkout: {check.stderr[-200:]!r}")
        out = run(["say", "Hello.", "-o", str(locked / "x.wav"), "--model", NO_MODEL], home, work, prefix=prefix)
        assert one_line(out) == f"error: permission denied: {locked}: check its permissions or use another path"
        out = run(["say", "Hello.", "-o", str(locked / "new" / "x.wav"), "--model", NO_MODEL], home, work, prefix=prefix)
        assert one_line(out) == f"error: permission denied: {locked / 'new'}: check its permissions or use another path"
    finally:
        shutil.rmtree(base, ignore_errors=True)


# ---- a broken pipe -----------------------------------------------------------------------------

@pytest.mark.parametrize("argv", [["history", "list"], ["voice", "list"], ["voice", "show", "narrator"]])
def test_a_broken_pipe_ends_quietly(argv: list[str], tmp_path: Path, companion_home: Path) -> None:
    """`companion ... | head -1` where head has gone: the reader's end is closed before anything is written."""
    read, write = os.pipe()
    os.close(read)
    try:
        out = run(argv, companion_home, tmp_path, stdout=write)
    finally:
        os.close(write)
    assert out.returncode != 0
    assert out.stderr == b""  # quiet: no traceback, no "Exception ignored", no error line


# ---- stdin that is not UTF-8 -------------------------------------------------------------------

def test_binary_stdin_is_refused_in_one_line_before_the_model(tmp_path: Path, companion_home: Path) -> None:
    noise = random.Random(19)
    for sample in range(5):
        data = bytes(noise.randrange(256) for _ in range(2048))
        if sample % 2:
            data = data.replace(b"\0", b"")  # binary without a NUL byte is still not text
        out = run(["say", "-", "--model", NO_MODEL, "-o", "x.wav"], companion_home, tmp_path, stdin=data)
        assert one_line(out) == "error: stdin is not text (it holds binary data): give UTF-8 text"
        assert out.returncode == 2


def test_latin1_stdin_gets_one_warning_then_goes_on(tmp_path: Path, companion_home: Path) -> None:
    """Text that is not UTF-8 is read as Windows-1252 (its words kept: "café"), after one warning."""
    out = run(["say", "-", "--model", NO_MODEL, "-o", "x.wav"], companion_home, tmp_path,
              stdin="Un café au lait, s'il vous plaît, et une crème brûlée.\n".encode("latin-1"))
    lines = out.stderr.decode().strip().splitlines()
    assert lines[0] == ("warning: stdin is not UTF-8: read as Windows-1252 (Latin-1); if words come out wrong, "
                        "save it as UTF-8")
    assert len(lines) == 2 and "model" in lines[1] and "unexpected" not in lines[1]  # it got as far as the model


def test_a_binary_line_piped_into_chat_is_one_line(tmp_path: Path, companion_home: Path, tiny_model_dir: Path) -> None:
    (tmp_path / "replies").mkdir()
    data = b"Hello.\n" + bytes(random.Random(7).randrange(256) for _ in range(300)) + b"\n"
    out = run(["chat", "--model", str(tiny_model_dir), "--save-dir", "replies"], companion_home, tmp_path, stdin=data)
    errors = [ln for ln in out.stderr.decode().splitlines() if ln.startswith("error")]
    assert out.returncode != 0
    assert errors == ["error: stdin line 2 is not text (it holds binary data): give UTF-8 text"]
    assert "unexpected" not in out.stderr.decode() + out.stdout.decode()


def test_a_latin1_line_piped_into_chat_is_spoken_after_one_warning(tmp_path: Path, companion_home: Path,
                                                                   tiny_model_dir: Path) -> None:
    (companion_home / "config").mkdir(parents=True)
    (companion_home / "config" / "config.yaml").write_text("generation:\n  max_segment_seconds: 1\n")
    data = "Caf\xe9 au lait.\nThe cr\xe8me.\n".encode("latin-1")
    out = run(["chat", "--model", str(tiny_model_dir), "--save-dir", "replies"], companion_home, tmp_path, stdin=data)
    text = out.stderr.decode() + out.stdout.decode()
    assert out.returncode == 0, text
    assert text.count("warning: stdin is not UTF-8: read as Windows-1252") == 1 and "unexpected" not in text
    assert len(list((tmp_path / "replies").glob("reply-*.wav"))) == 2


# ---- refused before the model loads ------------------------------------------------------------

def test_an_unwritable_output_is_refused_before_the_model_is_opened(tmp_path: Path, companion_home: Path,
                                                                    tiny_model_dir: Path) -> None:
    """With a real (tiny) model: the command ends on the output, and the model's loading line never shows."""
    (companion_home / "config").mkdir(parents=True)  # a short reply: its length proves nothing here
    (companion_home / "config" / "config.yaml").write_text("generation:\n  max_segment_seconds: 1\n")
    (tmp_path / "notes").write_text("not a folder")
    for target, message in [(tmp_path / "notes" / "x.wav", f"error: not a folder: {tmp_path / 'notes'}: give a folder"),
                            (tmp_path / "a" / "b" / "x.wav",
                             f"error: {tmp_path / 'a' / 'b' / 'x.wav'}: folder {tmp_path / 'a' / 'b'} does not exist: "
                             "create it first or write somewhere else")]:
        out = run(["say", "Hello.", "-o", str(target), "--model", str(tiny_model_dir)], companion_home, tmp_path)
        assert one_line(out) == message
        assert b"loaded" not in out.stdout + out.stderr and b"loading" not in out.stdout + out.stderr
    # and the same model, given a writable output, does load: the check above was what stopped it
    out = run(["say", "Hello.", "-o", str(tmp_path / "ok.wav"), "--model", str(tiny_model_dir)], companion_home, tmp_path)
    assert out.returncode == 0 and b"loaded" in out.stdout + out.stderr and (tmp_path / "ok.wav").stat().st_size > 44


def test_companion_home_that_is_a_file_or_a_symlink_loop(tmp_path: Path, companion_home: Path) -> None:
    (tmp_path / "afile").write_text("x")
    e = env(companion_home)
    e["COMPANION_HOME"] = str(tmp_path / "afile")
    out = subprocess.run([*COMPANION, "history", "list"], capture_output=True, env=e, cwd=tmp_path, timeout=120)
    assert one_line(out) == (f"error: not a folder: {tmp_path / 'afile'} (COMPANION_HOME): point COMPANION_HOME at "
                             "a folder (it is created if missing)")  # type: ignore[arg-type]
    (tmp_path / "loop").symlink_to(tmp_path / "loop")
    out = run(["say", "Hello.", "-o", "loop/x.wav", "--model", NO_MODEL], companion_home, tmp_path)
    assert one_line(out) == "error: symbolic link loop: loop: fix or remove the link"


def test_an_argument_that_is_not_utf8_gets_one_warning(tmp_path: Path, companion_home: Path) -> None:
    """Python keeps such bytes as surrogates, which crashed the first write of the text (UnicodeEncodeError)."""
    out = subprocess.run([*COMPANION, "say", b"Caf\xe9 au lait.", "-o", "x.wav", "--model", NO_MODEL],
                         capture_output=True, env=env(companion_home), cwd=tmp_path, timeout=120)
    lines = out.stderr.decode().strip().splitlines()
    assert lines[0] == ("warning: an argument is not UTF-8: read as Windows-1252 (Latin-1); if words come out "
                        "wrong, save it as UTF-8")
    assert len(lines) == 2 and "model" in lines[1] and "unexpected" not in lines[1]


def test_chat_onto_a_full_disk_is_one_line_and_chat_goes_on(mount_point: Path) -> None:
    """In chat, /save and a reply written as a WAV run in the real turn worker; its one place for a failure
    gives the commands' line, the worker goes on, and nothing half-written is left behind."""
    from types import SimpleNamespace

    import numpy as np

    from companion.audio.playback import WavWriter
    from companion.repl.lines import handle_line
    from companion.repl.slash import build_registry
    from companion.repl.turns import TurnWorker

    why = _mount_tmpfs(mount_point, "size=256k")
    if why:
        pytest.skip(why)
    _fill(mount_point)
    audio = np.full(48000, 0.25, dtype=np.float32)
    events: list = []
    worker = TurnWorker(lambda text, cancel: iter([audio]), WavWriter(mount_point), events.append)  # type: ignore[arg-type]
    ctx = SimpleNamespace(registry=build_registry(), ui=SimpleNamespace(error=events.append), worker=worker, replies=None,
                          session=SimpleNamespace(last_reply_audio=lambda: audio, conversation_audio=lambda: audio),
                          save_dir=mount_point)
    try:
        assert handle_line(ctx, "Hello there.") is True  # type: ignore[arg-type]
        assert handle_line(ctx, f"/save {mount_point / 'x.wav'}") is True  # type: ignore[arg-type]
        assert handle_line(ctx, "/save") is True  # type: ignore[arg-type]
        worker.wait_idle()
    finally:
        worker.close()
    errors = [e.message for e in events if getattr(e, "kind", None) == "error"]
    assert errors == [f"no space left on {mount_point}: free some space or write somewhere else"] * 3
    assert sorted(p.name for p in mount_point.iterdir()) == ["filler"]
