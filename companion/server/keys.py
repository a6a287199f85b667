"""The server's named API keys: ``keys.yaml`` in the data dir holds each key's name, an id and the
sha256 of the key, never the key itself (keys are long random tokens: a fast hash is enough, and a
guess costs as much as guessing the key). Written atomically, mode 0600.

A key's ``id`` (random, made when the key is added) names its conversations in the history: the same
conversation id under two keys is two conversations, and a key added again under a revoked key's name
does not see the old one's. ``COMPANION_API_KEY`` (``serve.api_key_env``) is one more key, with the
namespace "" that conversations made before named keys also have.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
import secrets
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from pydantic import Field

from companion.atomic import atomic_write
from companion.errors import CompanionError, UsageError
from companion.paths import get_paths
from companion.yamlfile import Schema, load_yaml

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
PREFIX = "csk-"  # "companion serve key": easy to recognize in a config or a leaked log


class KeyEntry(Schema):
    name: str = Field(pattern=NAME_RE.pattern)
    id: str = Field(pattern=r"^[0-9a-f]{16}$")
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    created: str = ""


class KeysFile(Schema):
    keys: list[KeyEntry] = []


@dataclass(frozen=True)
class Caller:
    """Who sent a request: a key's name ("" without named keys) and the namespace of its conversations."""

    name: str
    namespace: str


ANONYMOUS = Caller("", "")


def keys_path() -> Path:
    return get_paths().data_dir / "keys.yaml"


def digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


class KeyStore:
    """The keys file (``path``, default ``keys.yaml`` in the data dir); re-read when it changes."""

    def __init__(self, path: Path | None = None) -> None:
        self.path = path or keys_path()
        self._seen: tuple[int, int, int] | None = None
        self._entries: list[KeyEntry] = []

    def entries(self) -> list[KeyEntry]:
        """The keys, read again only when the file changed (a stat per call)."""
        try:
            st = self.path.stat()
        except FileNotFoundError:
            self._seen, self._entries = None, []
            return []
        stamp = (st.st_mtime_ns, st.st_ino, st.st_size)
        if stamp != self._seen:
            self._entries = load_yaml(self.path, KeysFile).keys
            self._seen = stamp
        return self._entries

    def match(self, key: str) -> Caller | None:
        """The caller ``key`` belongs to, or None. Every entry is compared, in constant time."""
        wanted = digest(key).encode()
        found = None
        for entry in self.entries():
            if hmac.compare_digest(wanted, entry.sha256.encode()):
                found = Caller(entry.name, entry.id)
        return found

    def add(self, name: str) -> str:
        """A new key for ``name`` (returned once; only its hash is kept)."""
        if not NAME_RE.match(name):
            raise UsageError(f"key name {name!r}: use 1-64 letters, digits or _ . - (starting with a letter or digit)")
        entries = list(self.entries())
        if any(e.name == name for e in entries):
            raise UsageError(f"a key named '{name}' exists: revoke it first (companion key revoke {name}) or pick another name")
        key = PREFIX + secrets.token_urlsafe(32)
        stamp = datetime.now(timezone.utc).isoformat(timespec="seconds")
        entries.append(KeyEntry(name=name, id=secrets.token_hex(8), sha256=digest(key), created=stamp))
        self._write(entries)
        return key

    def revoke(self, name: str) -> None:
        entries = self.entries()
        if not any(e.name == name for e in entries):
            known = ", ".join(e.name for e in entries) or "none"
            raise UsageError(f"no key named '{name}' (keys: {known}): `companion key list` shows them")
        self._write([e for e in entries if e.name != name])

    def _write(self, entries: list[KeyEntry]) -> None:
        import yaml

        data = {"keys": [e.model_dump() for e in entries]}
        text = "# companion serve's API keys: sha256 of each key, never the key (companion key add/list/revoke)\n"
        text += yaml.safe_dump(data, sort_keys=False)

        def write(tmp: Path) -> None:
            tmp.write_text(text, encoding="utf-8")
            os.chmod(tmp, 0o600)

        try:
            atomic_write(self.path, write)
        except OSError as err:
            raise CompanionError(f"cannot write {self.path}: {err.strerror or err}") from None
        self._seen = None
