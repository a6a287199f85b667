"""`companion devices`: list audio output devices."""

from __future__ import annotations

import argparse

from rich.console import Console
from rich.table import Table

from companion.audio.devices import output_devices
from companion.errors import CompanionError

HELP = "list audio output devices (use the number or name with --output-device)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    pass


def run(args: argparse.Namespace) -> int:
    devices = output_devices()
    if not devices:
        raise CompanionError(
            "no audio output device found: start an audio server (PulseAudio/PipeWire) or connect one; "
            "until then chat and say write WAV files instead"
        )
    table = Table(title="Audio outputs", title_justify="left")
    for column in ("", "#", "name", "host API", "channels", "rate"):
        table.add_column(column)
    for d in devices:
        table.add_row("*" if d.is_default else "", str(d.index), d.name, d.hostapi, str(d.channels),
                      f"{d.sample_rate:.0f}")
    console = Console(highlight=False)
    console.print(table)
    console.print("* the default. Pick another with `companion chat --output-device NUMBER|NAME`.")
    return 0
