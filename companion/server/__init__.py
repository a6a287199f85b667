"""`companion serve`: the voice as an OpenAI-compatible speech server (see docs/serve.md).

A front end beside companion/repl/: it drives the same session, engine and voices. ``create_app`` is
imported on first use, so `companion key` (companion/server/keys.py) works without the web packages.
"""

from __future__ import annotations

from typing import Any

__all__ = ["create_app"]


def __getattr__(name: str) -> Any:
    if name == "create_app":
        from companion.server.app import create_app

        return create_app
    raise AttributeError(name)
