"""Measuring a voice: speaker similarity of audio to a reference, per file and over a saved conversation.

``clips`` loads audio (through ``companion.audio.io``) and measures its bandwidth; ``encoder`` embeds it
with resemblyzer (the optional ``eval`` extra, imported on first use); ``similarity`` scores and judges;
``conversation`` scores every turn of a saved conversation; ``plot`` draws it. Nothing here imports the
REPL or the engine: decoding a conversation's audio is handed in by the caller.
"""
