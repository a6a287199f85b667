"""PortAudio through sounddevice: starting it quietly, listing output devices, choosing one.

sounddevice is imported only inside functions: a machine without PortAudio can still import companion.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import re
from dataclasses import dataclass
from types import ModuleType

from companion.audio.quiet import silence_alsa, stderr_silenced
from companion.errors import CompanionError

NO_PORTAUDIO = (
    "the PortAudio library is not installed (Debian/Ubuntu: sudo apt install libportaudio2; "
    "macOS: brew install portaudio)"
)


class AudioUnavailable(CompanionError):
    """No way to play sound here: no PortAudio, no audio server, or no output device."""


def load_sounddevice() -> ModuleType:
    """sounddevice, imported (PortAudio started) with libasound's and PortAudio's messages kept off the terminal."""
    silence_alsa()
    try:
        with stderr_silenced():
            import sounddevice
    except OSError as err:  # raised by sounddevice when libportaudio is missing
        raise AudioUnavailable(NO_PORTAUDIO) from err
    return sounddevice


@dataclass(frozen=True)
class OutputDevice:
    index: int
    name: str
    hostapi: str
    channels: int
    sample_rate: float
    is_default: bool


def output_devices() -> list[OutputDevice]:
    """Every device that can play sound; raises AudioUnavailable when PortAudio is missing."""
    sd = load_sounddevice()
    try:
        devices = sd.query_devices()
        hostapis = sd.query_hostapis()
    except sd.PortAudioError as err:
        raise AudioUnavailable(f"cannot list audio devices ({err})") from err
    default = _default_output(sd)
    return [
        OutputDevice(i, d["name"], hostapis[d["hostapi"]]["name"], d["max_output_channels"],
                     d["default_samplerate"], i == default)
        for i, d in enumerate(devices)
        if d["max_output_channels"] > 0
    ]


def _default_output(sd: ModuleType) -> int | None:
    try:
        index = sd.default.device[1]
    except (sd.PortAudioError, IndexError, TypeError):
        return None
    return index if isinstance(index, int) and index >= 0 else None


def resolve_device(spec: str | int | None) -> int | None:
    """``--output-device``: an index or (part of) a name from ``companion devices``; None is the default."""
    if spec is None or spec == "":
        return None
    devices = output_devices()
    if not devices:
        raise AudioUnavailable("no audio output device found (no audio server running?)")
    if isinstance(spec, int) or re.fullmatch(r"\d+", str(spec)):
        index = int(spec)
        if any(d.index == index for d in devices):
            return index
        raise CompanionError(f"there is no output device {index}: run `companion devices` to list them")
    matches = [d for d in devices if str(spec).lower() in d.name.lower()]
    if len(matches) == 1 or (matches and matches[0].name.lower() == str(spec).lower()):
        return matches[0].index
    if not matches:
        raise CompanionError(f"no output device matches {spec!r}: run `companion devices` to list them")
    names = ", ".join(f"{d.index}: {d.name}" for d in matches)
    raise CompanionError(f"{spec!r} matches several output devices ({names}): give its number instead")



def device_error_reason(err: BaseException) -> str:
    text = str(err).strip() or type(err).__name__
    if "querying device -1" in text or "Invalid device" in text or "No Default" in text.title():
        return "no audio device or server found: start PulseAudio/PipeWire or pick one with --output-device"
    return text


def set_alsa_periods(sd: ModuleType, count: int) -> bool:
    """Streams opened from now on split their ALSA buffer into ``count`` periods (PortAudio's default: 4).

    ALSA starts a stream once one period is written, so a 2 s buffer in 4 periods would hold back the
    first 0.5 s of a reply; in periods of 50 ms it starts with the prebuffer. False where PortAudio has no
    ALSA host (macOS, Windows), where the setting does not apply.
    """
    name = getattr(sd, "_libname", None) or ctypes.util.find_library("portaudio")
    if not name:
        return False
    try:
        fn = ctypes.CDLL(name).PaAlsa_SetNumPeriods
    except (OSError, AttributeError):
        return False
    fn.argtypes = [ctypes.c_int]
    return bool(fn(count) == 0)
