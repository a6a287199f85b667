"""A batch's output folder: what each script line is, what decides its audio, and what is done.

``manifest.json`` lists every line of the script: its index, the file its audio is in, the voice(s),
the text as written and as spoken, seconds, seed, and a hash of everything that decides the audio:

    hash(line) = sha256(hash of the line before, the line as written and as spoken, the default voice,
                        the identity of every voice it may use (profile, audio file bytes, transcript),
                        the model (id + weights), generation / context / reference / watermark settings,
                        companion's version and the reference preparation's)

Lines are spoken as one conversation (each line hears the lines before it), so a line's hash covers
the lines before it. A line is "done" once its WAV and its take (``.takes/NNN.safetensors``: the codes
and audio of each of its segments, as the model made them) are written; the manifest is rewritten
(atomically) after each line, so a killed run leaves one that says what is done. A rerun keeps the
done lines whose hash matches (a prefix of the script), feeds their takes back so the conversation
is rebuilt exactly, and renders the rest.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from companion.atomic import atomic_write, atomic_write_text
from companion.config import Settings
from companion.errors import CompanionError

MANIFEST = "manifest.json"
TAKES = ".takes"
CONVERSATION = "conversation.wav"
FORMAT = 1


@dataclass
class LineEntry:
    index: int  # 1-based, over the script's utterances ($CLEAR$ included)
    line: int  # its line number in the script
    text: str  # as written
    spoken: str  # as spoken (normalized)
    hash: str
    clear: bool = False  # a $CLEAR$ line: nothing is spoken
    done: bool = False
    file: str | None = None  # NNN-VOICE.wav, once done
    voice: str | None = None  # the voice(s) that spoke it ("a+b")
    seconds: float | None = None
    seed: int | None = None
    take: str | None = None  # .takes/NNN.safetensors, once done


@dataclass
class Manifest:
    script: str
    lines: list[LineEntry] = field(default_factory=list)
    complete: bool = False  # every line done and conversation.wav written
    format: int = FORMAT
    history: int | None = None  # the history conversation this run records (None: --no-history, or none yet)

    def write(self, folder: Path) -> None:
        data = {"format": self.format, "script": self.script, "complete": self.complete,
                "conversation": CONVERSATION if self.complete else None, "history": self.history,
                "done": sum(e.done for e in self.lines), "lines": [asdict(e) for e in self.lines]}
        atomic_write_text(folder / MANIFEST, json.dumps(data, indent=1, ensure_ascii=False) + "\n")

    @classmethod
    def read(cls, folder: Path) -> Manifest:
        """The folder's manifest; a one-line error when it cannot be read."""
        path = folder / MANIFEST
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            lines = [LineEntry(**e) for e in data["lines"]]
            history = data.get("history")
            return cls(str(data["script"]), lines, bool(data["complete"]), int(data["format"]),
                       int(history) if history is not None else None)
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise CompanionError(f"{path}: cannot be read ({type(err).__name__}): pass --force to render everything "
                                 "again, or choose another -o DIR") from None

    def kept(self, plan: list[LineEntry], folder: Path) -> int:
        """How many lines of ``plan``, from the first, are done here with the same hash and their files."""
        count = 0
        for old, new in zip(self.lines, plan, strict=False):
            if old.hash != new.hash or not old.done:
                break
            if not old.clear and not all(f and (folder / f).is_file() for f in (old.file, old.take)):
                break
            count += 1
        return count


def line_hash(previous: str, parts: dict[str, Any]) -> str:
    digest = hashlib.sha256(previous.encode())
    digest.update(json.dumps(parts, sort_keys=True, ensure_ascii=False, default=str).encode())
    return digest.hexdigest()


def settings_identity(settings: Settings) -> dict[str, Any]:
    """The settings that decide the audio (the model's identity and the program's version included)."""
    from companion import __version__
    from companion.audio.prepare import PIPELINE_VERSION

    return {"model": model_identity(settings), "companion": __version__, "preparation": PIPELINE_VERSION,
            **{k: getattr(settings, k).model_dump(mode="json") for k in ("model", "generation", "context",
                                                                        "reference", "watermark")}}


def model_identity(settings: Settings) -> str:
    """The model's id and weights, known without loading it (as the engine's model key says them)."""
    from companion.engine.loading import weights_fingerprint
    from companion.refbudget import model_folder

    local = Path(settings.model.id).expanduser()
    if local.is_dir():
        return f"{local.resolve()}@{weights_fingerprint(local)}"
    folder = model_folder(settings)
    return f"{settings.model.id}@{folder.name if folder is not None else settings.model.revision}"


def voice_identity(store: Any, name: str) -> dict[str, Any]:
    """What a voice brings to the audio: its profile, its audio files' bytes, its transcript."""
    try:
        profile = store.get(name)
    except CompanionError:
        return {"name": name}  # the default voice before it has a profile: made by the first line
    files = profile.audio_paths()
    return {"profile": profile.model_dump(mode="json"), "transcript": profile.transcript_text(),
            "audio": [hashlib.sha256(f.read_bytes()).hexdigest() for f in files]}


# ---- takes: each segment's chunks (codes and audio) as the model made them -------------------------


def write_take(path: Path, segments: list[tuple[int, str, list[tuple[np.ndarray, np.ndarray]]]]) -> None:
    """Save ``[(speaker, text, [(codes (K, f) int64, audio (n,) float32), ...]), ...]`` (safetensors)."""
    from safetensors.numpy import save_file

    tensors: dict[str, np.ndarray] = {}
    meta = []
    for s, (speaker, text, chunks) in enumerate(segments):
        meta.append({"speaker": speaker, "text": text, "chunks": len(chunks)})
        for c, (codes, audio) in enumerate(chunks):
            tensors[f"s{s}.c{c}.codes"] = np.ascontiguousarray(codes, dtype=np.int64)
            tensors[f"s{s}.c{c}.audio"] = np.ascontiguousarray(audio, dtype=np.float32)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata={"segments": json.dumps(meta)}))


def read_take(path: Path) -> list[tuple[int, str, list[tuple[np.ndarray, np.ndarray]]]]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="numpy") as f:
            meta = json.loads((f.metadata() or {})["segments"])
            return [(int(m["speaker"]), str(m["text"]),
                     [(f.get_tensor(f"s{s}.c{c}.codes"), f.get_tensor(f"s{s}.c{c}.audio")) for c in range(m["chunks"])])
                    for s, m in enumerate(meta)]
    except Exception as err:  # safetensors raises its own errors for a damaged file
        raise CompanionError(f"{path}: cannot be read ({type(err).__name__}): pass --force to render everything again") from None
