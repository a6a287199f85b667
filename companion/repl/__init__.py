"""The terminal UI: the prompt_toolkit REPL, its toolbar and completion, the slash-command registry, rich output.

The only layer that owns prompt_toolkit and rich objects (see docs/architecture.md and docs/chat.md).
"""
