"""`companion serve`: the voice as an OpenAI-compatible speech server (see docs/serve.md).

A front end beside companion/repl/: it drives the same session, engine and voices.
"""

from __future__ import annotations

from companion.server.app import create_app

__all__ = ["create_app"]
