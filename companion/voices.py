"""Voice profiles (one YAML file per voice) and loading a voice's encoded reference.

User profiles live in ``paths.voices_dir``; the shipped examples in ``config/voices`` (a user profile
with the same name wins). Audio and transcript paths are relative to the profile's folder, then to
``clone_files`` (the user's ``paths.clone_dir``, then the shipped one); absolute paths are fine too.
"""

from __future__ import annotations

import builtins
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import yaml
from pydantic import Field, PrivateAttr, field_validator
from pydantic_core import PydanticCustomError

from companion.atomic import atomic_write_text
from companion.audio.io import write_wav
from companion.audio.prepare import SAMPLE_RATE, PreparationReport, prepare_references
from companion.config import ReferenceSettings, Settings
from companion.errors import CompanionError
from companion.paths import Paths, get_paths, shipped_clone_dir, shipped_config_dir
from companion.textfile import read_text_file
from companion.yamlfile import Schema, load_yaml

if TYPE_CHECKING:
    import torch

    from companion.refcache import ReferenceCache

DEFAULT_VOICE = "default"  # the voice used when none is chosen (a profile with no reference audio at first)
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")


class GenerationOverrides(Schema):
    """Per-voice generation settings; unset ones come from the config."""

    temperature: float | None = Field(default=None, ge=0.0, le=5.0, allow_inf_nan=False)
    topk: int | None = Field(default=None, ge=1, le=2051)
    seed: int | None = Field(default=None, ge=0, le=2**63 - 1)

    def as_dict(self) -> dict[str, Any]:
        return {k: v for k, v in self.model_dump().items() if v is not None}


class VoiceProfile(Schema):
    name: str
    audio: list[str] = []  # one path or a list (several recordings of the same speaker, in order)
    transcript: str | None = None  # what is said in the audio, inline ...
    transcript_file: str | None = None  # ... or in a UTF-8 text file
    speaker: int = Field(0, ge=0)  # CSM speaker id
    generation: GenerationOverrides = GenerationOverrides()
    persona: str | None = None  # the LLM's system prompt while this voice speaks (chat mode); None: llm.system_prompt
    _path: Path | None = PrivateAttr(None)  # the YAML file it came from (None: not saved yet)

    @field_validator("name")
    @classmethod
    def _valid_name(cls, value: str) -> str:
        if not NAME_RE.match(value):
            raise PydanticCustomError(
                "voice_name", "'{name}' is not a valid voice name: use letters, digits, '-' and '_' (max 64)",
                {"name": value},
            )
        return value

    @field_validator("audio", mode="before")
    @classmethod
    def _one_or_many(cls, value: Any) -> Any:
        if value is None:
            return []
        if isinstance(value, str):
            return [value]
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise PydanticCustomError("audio_paths", "expected a file path or a list of file paths")
        return value

    @field_validator("persona")
    @classmethod
    def _persona_not_blank(cls, value: str | None) -> str | None:
        if value is not None and not value.strip():
            raise PydanticCustomError("empty_persona", "is empty: describe who the voice is, or remove the key")
        return value

    @field_validator("transcript")
    @classmethod
    def _not_blank(cls, value: str | None) -> str | None:
        if value is not None and not value.strip():
            raise PydanticCustomError("empty_transcript", "is empty: write the words spoken in the audio")
        return value

    @property
    def path(self) -> Path | None:
        return self._path

    def where(self) -> str:
        return str(self._path) if self._path else f"voice '{self.name}'"

    def to_yaml(self) -> str:
        data: dict[str, Any] = {"name": self.name, "speaker": self.speaker}
        if self.audio:
            data["audio"] = self.audio[0] if len(self.audio) == 1 else list(self.audio)
        if self.transcript is not None:
            data["transcript"] = self.transcript
        if self.transcript_file is not None:
            data["transcript_file"] = self.transcript_file
        if self.generation.as_dict():
            data["generation"] = self.generation.as_dict()
        if self.persona is not None:
            data["persona"] = self.persona
        return yaml.safe_dump(data, sort_keys=False, allow_unicode=True, width=100)

    def check(self) -> None:
        """Rules across keys, as one-line errors naming the file."""
        if self.transcript is not None and self.transcript_file is not None:
            raise CompanionError(f"{self.where()}: both 'transcript' and 'transcript_file' are set: keep one")
        if self.audio and self.transcript is None and self.transcript_file is None:
            raise CompanionError(
                f"{self.where()}: transcript missing: add 'transcript: <the words spoken>' or 'transcript_file: FILE'"
            )

    def resolve(self, ref: str, paths: Paths | None = None) -> Path:
        """The file ``ref`` names: absolute, or relative to the profile's folder, then to clone_files."""
        paths = paths or get_paths()
        given = Path(ref).expanduser()
        if given.is_absolute():
            candidates = [given]
        else:
            bases = ([self._path.parent] if self._path else [Path.cwd()]) + [paths.clone_dir, shipped_clone_dir()]
            candidates = [base / given for base in bases]
        for candidate in candidates:
            if candidate.exists():
                return candidate
        if given.is_absolute():
            raise CompanionError(f"{self.where()}: file '{ref}' not found: check the path")
        looked = ", ".join(str(c.parent) for c in candidates)
        raise CompanionError(
            f"{self.where()}: file '{ref}' not found (looked in {looked}): fix the path or put the file in {paths.clone_dir}"
        )

    def audio_paths(self, paths: Paths | None = None) -> list[Path]:
        return [self.resolve(ref, paths) for ref in self.audio]

    def transcript_text(self, paths: Paths | None = None) -> str | None:
        """The transcript (inline or read from ``transcript_file``); None when the profile has none."""
        self.check()
        if self.transcript_file is None:
            return self.transcript.strip() if self.transcript else None
        return read_transcript(self.resolve(self.transcript_file, paths))


def read_transcript(path: Path) -> str:
    """A transcript file's text; one-line errors for a missing, unreadable or empty file."""
    text = read_text_file(path, "transcript file").strip()
    if not text:
        raise CompanionError(f"{path}: transcript file is empty: write the words spoken in the audio")
    return text


@dataclass(frozen=True)
class BrokenProfile:
    """A profile file that cannot be read: the other voices keep working, this one reports its error."""

    name: str  # the name the file declares, else its file name without the extension
    path: Path
    error: str  # the one-line error (naming the file)


class VoiceStore:
    """The voice profiles: the user's (``paths.voices_dir``) over the shipped examples.

    A profile that cannot be read is not a reason to refuse the others: it is kept aside
    (``broken()``) and only using that voice raises its error.
    """

    def __init__(self, paths: Paths | None = None, shipped_dir: Path | None = None) -> None:
        self.paths = paths or get_paths()
        self.shipped_dir = shipped_dir if shipped_dir is not None else shipped_config_dir() / "voices"

    @property
    def user_dir(self) -> Path:
        return self.paths.voices_dir

    def list(self) -> list[VoiceProfile]:
        merged = self._merged()
        return [p for name, p in sorted(merged.items()) if isinstance(p, VoiceProfile)]

    def broken(self) -> builtins.list[BrokenProfile]:
        """The profiles that cannot be read (a user file shadowing a shipped voice included)."""
        user_good, user_broken = self._scan(self.user_dir)
        shipped_broken = [b for b in self._scan(self.shipped_dir)[1] if b.name not in user_good]
        return sorted(user_broken + shipped_broken, key=lambda b: (b.name, str(b.path)))

    def problem(self, profile: VoiceProfile, settings: Settings | None = None) -> str | None:
        """Why ``profile`` cannot be used (a missing file, a recording too long for the context), or None."""
        return self.file_problem(profile) or self.too_long(profile, settings)

    def file_problem(self, profile: VoiceProfile) -> str | None:
        """Why ``profile``'s audio or transcript cannot be read (a missing file), or None."""
        try:
            profile.audio_paths(self.paths)
            profile.transcript_text(self.paths)
        except CompanionError as err:
            return str(err)
        return None

    def too_long(self, profile: VoiceProfile, settings: Settings | None = None) -> str | None:
        """The refusal ``voice add`` gives when ``profile``'s recording can never fit the context (with
        ``settings``, default: the config file's), else None. Its files must be readable."""
        from companion.config import load_settings
        from companion.refbudget import too_long

        files = profile.audio_paths(self.paths)
        if not files:
            return None
        try:
            settings = settings or load_settings(self.paths)
        except CompanionError:
            return None  # an invalid config: every command says so on its own
        return too_long(settings, profile.name, files, profile.transcript_text(self.paths) or "", profile.speaker)

    def _merged(self) -> dict[str, VoiceProfile | BrokenProfile]:
        """name -> the profile that counts (a user file over a shipped one), good or broken."""
        merged: dict[str, VoiceProfile | BrokenProfile] = {}
        for directory in (self.shipped_dir, self.user_dir):
            good, broken = self._scan(directory)
            for b in broken:
                if b.name not in good:
                    merged[b.name] = b
            merged.update(good)
        return merged

    def names(self) -> builtins.list[str]:
        return [p.name for p in self.list()]

    def get(self, name: str) -> VoiceProfile:
        found = self._merged().get(name)
        if isinstance(found, VoiceProfile):
            return found
        if isinstance(found, BrokenProfile):
            raise CompanionError(found.error)
        known = ", ".join(self.names()) or "none yet"
        raise CompanionError(f"unknown voice '{name}' (voices: {known}): add it with `companion voice add {name} --audio FILE ...`")

    def is_user(self, profile: VoiceProfile) -> bool:
        return profile.path is not None and profile.path.parent.resolve() == self.user_dir.resolve()

    def add(self, profile: VoiceProfile, *, force: bool = False) -> Path:
        """Save a new profile; an existing voice of that name is an error unless ``force``."""
        profile.check()
        existing = self._merged().get(profile.name)
        if isinstance(existing, BrokenProfile) and not force:
            raise CompanionError(
                f"voice '{profile.name}' already exists but cannot be read ({existing.error}): "
                "fix that file, or pass --force to replace it"
            )
        if isinstance(existing, VoiceProfile) and not force:
            raise CompanionError(
                f"voice '{profile.name}' already exists ({existing.where()}): choose another name or pass --force to replace it"
            )
        return self.save(profile)

    def save(self, profile: VoiceProfile) -> Path:
        """Write ``profile`` atomically to the user's voices folder (a shipped one is copied there)."""
        profile.check()
        current = self._load_dir(self.user_dir).get(profile.name)
        broken = [b.path for b in self._scan(self.user_dir)[1] if b.name == profile.name]
        target = current.path if current and current.path else (broken[0] if broken else self.user_dir / f"{profile.name}.yaml")
        assert target is not None
        self._rebase(profile, target.parent)
        atomic_write_text(target, profile.to_yaml())
        profile._path = target
        return target

    def remove(self, name: str) -> Path:
        """Delete the user's profile ``name`` (its audio files are kept)."""
        profile = self.get(name)
        if not self.is_user(profile) or profile.path is None:
            raise CompanionError(
                f"voice '{name}' is a shipped example ({profile.where()}) and cannot be removed: "
                "add your own voice with another name"
            )
        profile.path.unlink()
        return profile.path

    def attach_reference(self, profile: VoiceProfile, audio: np.ndarray, transcript: str) -> VoiceProfile:
        """Make generated ``audio`` (n,) float32 24 kHz the voice's reference, with its ``transcript``.

        Writes ``NAME.wav`` next to the user's profile, points ``audio:`` at it, sets ``transcript:``
        and saves the profile (all writes atomic). Returns the updated profile.
        """
        updated = profile.model_copy(update={"audio": [f"{profile.name}.wav"], "transcript": transcript,
                                             "transcript_file": None})
        updated = VoiceProfile.model_validate(updated.model_dump())  # re-run the checks
        current = self._load_dir(self.user_dir).get(profile.name)
        updated._path = current.path if current else self.user_dir / f"{profile.name}.yaml"
        write_wav(self.user_dir / f"{profile.name}.wav", audio, SAMPLE_RATE)
        self.save(updated)
        return updated

    def _load_dir(self, directory: Path) -> dict[str, VoiceProfile]:
        return self._scan(directory)[0]

    def _scan(self, directory: Path) -> tuple[dict[str, VoiceProfile], builtins.list[BrokenProfile]]:
        """The readable profiles in ``directory`` by name, and the files that are not."""
        found: dict[str, VoiceProfile] = {}
        broken: builtins.list[BrokenProfile] = []
        files = sorted(directory.glob("*.yaml")) + sorted(directory.glob("*.yml")) if directory.is_dir() else []
        for file in files:
            try:
                profile = load_yaml(file, VoiceProfile, allow_empty=False)
                profile._path = file
                profile.check()
            except CompanionError as err:
                broken.append(BrokenProfile(_declared_name(file), file, str(err)))
                continue
            if profile.name in found:
                broken.append(BrokenProfile(profile.name, file, (
                    f"{file}: duplicate voice name '{profile.name}' (also in {found[profile.name].path}): rename one of them"
                )))
                continue
            found[profile.name] = profile
        return found, broken

    def _rebase(self, profile: VoiceProfile, new_dir: Path) -> None:
        """Relative paths that only resolve from the profile's old folder become absolute."""
        old_dir = profile.path.parent if profile.path else Path.cwd()
        if old_dir.resolve() == new_dir.resolve():
            return

        def fix(ref: str) -> str:
            here = old_dir / ref
            return str(here.resolve()) if not Path(ref).is_absolute() and here.exists() else ref

        profile.audio = [fix(ref) for ref in profile.audio]
        if profile.transcript_file is not None:
            profile.transcript_file = fix(profile.transcript_file)


def _declared_name(file: Path) -> str:
    """The ``name:`` a profile file declares, read leniently; else the file name without extension."""
    try:
        data = yaml.safe_load(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return file.stem
    name = data.get("name") if isinstance(data, dict) else None
    return name if isinstance(name, str) and NAME_RE.match(name) else file.stem


class ReferenceEncoder(Protocol):
    """What ``load_voice`` needs from the engine."""

    model_key: str
    codec_key: str  # the codec's dtype, device and weights (part of the reference-cache key)

    def encode(self, audio: np.ndarray) -> torch.Tensor: ...


@dataclass
class PreparedVoice:
    name: str
    speaker: int
    transcript: str | None
    codes: torch.Tensor | None  # (K, T) int64 on CPU; None when the profile has no audio yet
    audio: np.ndarray | None = None  # (n,) float32 24 kHz, only when prepared by this call (not on a cache hit)
    generation: dict[str, Any] = field(default_factory=dict)  # temperature/topk/seed the profile sets
    cache_hit: bool = False
    reports: list[PreparationReport] = field(default_factory=list)


def load_voice(
    profile: VoiceProfile, engine: ReferenceEncoder, settings: ReferenceSettings, cache: ReferenceCache,
    paths: Paths | None = None,
) -> PreparedVoice:
    """The voice's reference codes: from the cache, or prepared + encoded + cached on a miss."""
    import torch

    transcript = profile.transcript_text(paths)
    voice = PreparedVoice(profile.name, profile.speaker, transcript, None, generation=profile.generation.as_dict())
    files = profile.audio_paths(paths)
    if not files:
        return voice
    with cache.making():  # the files are not replaced meanwhile, and two callers encode them once
        key = cache.key(files, settings, engine.model_key, engine.codec_key)
        voice.codes = cache.get(key)
        if voice.codes is not None:
            voice.cache_hit = True
            return voice
        prepared = prepare_references(files, settings)
        codes = engine.encode(prepared.samples)
        if codes.dim() != 2:
            raise CompanionError(f"{profile.where()}: the engine returned codes of shape {tuple(codes.shape)}, expected (K, T)")
        voice.codes, voice.audio, voice.reports = codes.to("cpu", torch.int64), prepared.samples, prepared.reports
        cache.put(key, voice.codes, {"voice": profile.name, "model": engine.model_key,
                                     "files": ", ".join(str(f) for f in files)})
    return voice
