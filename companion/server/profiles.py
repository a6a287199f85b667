"""The voice profiles, read again only when a profile file changes (every request names a voice)."""

from __future__ import annotations

import builtins
import threading
from pathlib import Path

from companion.voices import VoiceProfile, VoiceStore


class WatchedVoiceStore(VoiceStore):
    """``VoiceStore`` whose ``list()`` is kept until a profile file is added, removed or rewritten.

    Reading and validating every YAML file takes milliseconds; checking their size and modification
    time takes microseconds. Profiles are written atomically (a new file replaces the old), so a
    rewrite always changes what is checked. Safe from several threads (the event loop and the speech
    threads): the profiles and the stamp they were read at change together.
    """

    _stamp: tuple[tuple[str, int, int], ...] | None = None
    _profiles: builtins.list[VoiceProfile] = []
    _lock = threading.Lock()

    def list(self) -> builtins.list[VoiceProfile]:
        with self._lock:
            stamp = _stamp(self.shipped_dir) + _stamp(self.user_dir)
            if stamp != self._stamp:
                self._profiles = super().list()
                self._stamp = stamp
            return builtins.list(self._profiles)


def _stamp(directory: Path) -> tuple[tuple[str, int, int], ...]:
    if not directory.is_dir():
        return ()
    found = []
    for file in sorted([*directory.glob("*.yaml"), *directory.glob("*.yml")]):
        try:
            st = file.stat()
        except OSError:
            continue
        found.append((str(file), st.st_mtime_ns, st.st_size))
    return tuple(found)
