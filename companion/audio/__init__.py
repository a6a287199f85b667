"""Audio: file I/O (``io``), reference preparation (``prepare``) and playback (``playback``).

Nothing is imported here, so ``import companion.audio.io`` stays light and never loads sounddevice.
"""
