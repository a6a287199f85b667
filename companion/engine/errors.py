"""Engine failures the user can act on (each a one-line CompanionError)."""

from __future__ import annotations

from companion.errors import CompanionError


class ContextTooLong(CompanionError):
    """The prompt plus the frames to generate do not fit the context budget."""

    def __init__(self, needed: int, available: int, prompt: int, max_frames: int) -> None:
        super().__init__(
            f"the prompt does not fit the context: it needs {needed} positions ({prompt} for the prompt + "
            f"{max_frames} for the reply) but only {available} are available; use a shorter reference clip, "
            "type $CLEAR$ to drop the conversation so far, or raise context.max_seq_len in config.yaml"
        )
        self.needed = needed
        self.available = available


class ModelLoadError(CompanionError):
    """The model could not be found, downloaded or loaded."""


class EngineBusy(CompanionError):
    """A stream was started while the engine already speaks as many as it can (one, or ``max_batch``)."""

    def __init__(self, live: str, streams: int = 1) -> None:
        if streams == 1:
            super().__init__(
                f"this engine is still speaking {live}: finish or close that stream before starting another "
                "(one engine speaks one stream at a time)"
            )
        else:
            super().__init__(
                f"this engine is already speaking {streams} streams (the first: {live}): finish or close one "
                f"before starting another, or raise engine.max_batch"
            )
        self.live = live
