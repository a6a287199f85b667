"""`companion serve`: speak over HTTP, as an OpenAI-compatible speech server (docs/serve.md)."""

from __future__ import annotations

import argparse
import ipaddress
import logging
import os
import signal
import sys
from typing import Any

from companion.commands.common import add_model_arguments, check_memory, settings_from_args, torch_threads
from companion.config import Settings
from companion.errors import CompanionError, UsageError

HELP = "serve the voice over HTTP as an OpenAI-compatible speech endpoint, with conversation memory"
DESCRIPTION = (
    "Serve POST /v1/audio/speech (OpenAI's text-to-speech API) with your voices, streaming audio as it is "
    "generated; the extension field `conversation` keeps the context across requests. Listens on "
    "127.0.0.1 unless told otherwise; any other address needs an API key: named keys made with `companion key add`, "
    "or one in the environment variable named by serve.api_key_env (COMPANION_API_KEY by default). "
    "Stop it with Ctrl-C or SIGTERM."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", metavar="ADDRESS", help="address to listen on (default: serve.host, 127.0.0.1)")
    parser.add_argument("--port", type=int, metavar="N", help="port to listen on (default: serve.port, 8000; 0: any free port)")
    parser.add_argument("--queue-size", type=int, metavar="N",
                        help="requests that may wait while engine.max_batch others are spoken, before clients get 429 "
                             "(default: serve.queue_size)")
    parser.add_argument("--no-watermark", action="store_true", help="do not mark the audio as AI-generated")
    parser.add_argument("--log-level", choices=["debug", "info", "warning", "error"], default="info",
                        help="how much the server logs (default info)")
    add_model_arguments(parser)


def run(args: argparse.Namespace) -> int:
    settings = _settings(args)
    host, port = settings.serve.host, settings.serve.port
    from companion.server.keys import KeyStore

    keys = KeyStore()
    api_key = _api_key(settings, host, keys)
    check_memory(settings, settings.engine.max_batch)  # what the memory cannot hold fails now, before loading
    try:
        import uvicorn

        from companion.server import create_app
        from companion.server.connections import limit_log_repeats
    except ImportError as err:
        raise CompanionError(
            f"companion serve needs the web server packages ({err.name} is missing): pip install 'companion[serve]'"
        ) from None
    _log_to_stderr(args.log_level)
    failure: list[str] = []
    server: Any = None

    def fatal(message: str) -> None:
        failure.append(message)
        if server is not None:
            server.should_exit = True

    app = create_app(settings, api_key=api_key, on_fatal=fatal, keys=keys)
    config = uvicorn_config(app, settings, host, port, args.log_level, app.state.companion.refusals)
    limit_log_repeats()  # after uvicorn set its loggers up
    server = uvicorn.Server(config)
    where = f"[{host}]" if ":" in host else host
    print(f"companion serve: loading {settings.model.id} ({_keys_line(api_key, keys)})", file=sys.stderr, flush=True)
    # uvicorn stops gracefully on SIGTERM, then raises the signal again for the handler it found: make
    # that one a no-op so that a stop by SIGTERM (systemd's) ends with "stopped" and exit code 0.
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: None)
    try:
        with torch_threads(settings.engine.threads):
            server.run()
    except SystemExit:  # uvicorn exits when it cannot listen (after logging why)
        server.started = False
    finally:
        signal.signal(signal.SIGTERM, previous)
    if failure:
        raise CompanionError(failure[0])
    if not server.started:
        raise CompanionError(f"could not listen on {where}:{port}: is another program using that port? pick another --port")
    print("companion serve: stopped", file=sys.stderr)
    return 0


def uvicorn_config(app: Any, settings: Settings, host: str, port: int, log_level: str, refusals: Any) -> Any:
    """uvicorn's settings for ``app``: its own limits (keep-alive, header size) and the protocol that adds
    the connection cap and the header time limit (companion/server/connections.py)."""
    import math

    import uvicorn

    from companion.server.connections import connection_cap, guarded_protocol

    s = settings.serve
    cap = connection_cap(s.max_connections)
    return uvicorn.Config(app, host=host, port=port, log_level=log_level, access_log=log_level == "debug",
                          timeout_graceful_shutdown=max(1, int(s.shutdown_timeout_seconds)), server_header=False,
                          http=guarded_protocol(cap, s.header_timeout_seconds, refusals),
                          timeout_keep_alive=max(1, math.ceil(s.keep_alive_seconds)), backlog=min(2048, cap))


def _keys_line(api_key: str | None, keys: Any) -> str:
    named = len(keys.entries())
    if named:
        return f"{named} named API key{'s' if named > 1 else ''}" + (" and the one in the environment" if api_key else "")
    return "API key required" if api_key else "no API key"


def _settings(args: argparse.Namespace) -> Settings:
    serve = {"host": args.host, "port": args.port, "queue_size": args.queue_size}
    extra: dict[str, Any] = {"serve": serve}
    if args.no_watermark:
        extra["watermark"] = {"enabled": False}
    if args.port is not None and not 0 <= args.port <= 65535:
        raise UsageError(f"--port {args.port}: use a port from 0 to 65535")
    if args.queue_size is not None and args.queue_size < 0:
        raise UsageError("--queue-size must be 0 or more")
    return settings_from_args(args, extra)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _api_key(settings: Settings, host: str, keys: Any) -> str | None:
    """The key from the environment (never from the command line); a key (that one, or a named one) is
    required off the loopback address."""
    env = settings.serve.api_key_env
    key = os.environ.get(env, "").strip() or None
    if key is None and not keys.entries() and not is_loopback(host):
        raise CompanionError(
            f"--host {host} would accept connections from other machines without an API key: "
            f"make one with `companion key add NAME`, or set one in the environment variable {env} "
            "(clients send 'Authorization: Bearer KEY'); or listen on 127.0.0.1"
        )
    return key


def _log_to_stderr(level: str) -> None:
    logger = logging.getLogger("companion.serve")
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("companion serve: %(message)s"))
        logger.addHandler(handler)
        logger.propagate = False
    logger.setLevel(level.upper())
