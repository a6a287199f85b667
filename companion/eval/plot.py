"""A small PNG of similarity over a conversation's turns: one line per voice, its trend, the verdict bands."""

from __future__ import annotations

import os

from companion.atomic import atomic_write
from companion.errors import CompanionError
from companion.eval.conversation import Drift
from companion.eval.encoder import INSTALL
from companion.eval.similarity import BANDS

SHADES = ("#e3f2e1", "#f1f6df", "#fbf0dc", "#f8e1df")  # best to worst band


def write_plot(path: str | os.PathLike[str], session_id: int, drifts: list[Drift]) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only: never open a window
        import matplotlib.pyplot as plt
        from matplotlib.ticker import MaxNLocator
    except ImportError:
        raise CompanionError(f"--plot needs matplotlib, which is not installed: install it with {INSTALL}") from None
    import numpy as np

    fig, ax = plt.subplots(figsize=(7, 3.6), dpi=110)
    try:
        measured = [d for d in drifts if d.scores]
        for d in measured:
            (line,) = ax.plot(d.turns, d.scores, marker="o", label=f"{d.voice} (mean {d.mean:.3f})")
            if d.slope is not None:
                xs = np.asarray([d.turns[0], d.turns[-1]], dtype=np.float64)
                fit = np.polyfit(d.turns, d.scores, 1)
                ax.plot(xs, np.polyval(fit, xs), "--", color=line.get_color(), linewidth=1,
                        label=f"{d.voice} trend ({d.slope:+.4f} per turn)")
        scores = [s for d in measured for s in d.scores]
        bottom = min([0.7, *scores]) - 0.02
        ax.set_ylim(bottom, 1.0)
        top = 1.0
        for (low, name), shade in zip(BANDS, SHADES, strict=True):  # the verdict bands, shaded and named
            low = max(low, bottom)
            ax.axhspan(low, top, color=shade, zorder=0)
            ax.text(1.005, (low + top) / 2, name, transform=ax.get_yaxis_transform(), va="center", fontsize=7)
            top = low
        ax.set_xlabel("turn")
        ax.set_ylabel("similarity to the reference")
        ax.set_title(f"conversation {session_id}: voice similarity per turn")
        if measured:
            ax.legend(loc="best", fontsize=7)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # turns are whole numbers
        fig.tight_layout()
        atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))
    finally:
        plt.close(fig)
