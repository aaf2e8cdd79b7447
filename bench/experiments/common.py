"""Output helpers shared by the experiment scripts: the docs/toys folder, markdown summaries, figures."""

from __future__ import annotations

import datetime
import os
import sys

import torch

TOYS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "docs", "toys")


def write_summary(name: str, title: str, table: str) -> None:
    """docs/toys/<name>.md: the table with date, versions and the command (the plot <name>.png sits beside it)."""
    os.makedirs(TOYS_DIR, exist_ok=True)
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d")
    with open(os.path.join(TOYS_DIR, f"{name}.md"), "w") as f:
        f.write(f"# {title}\n\n{stamp}, CPU, torch {torch.__version__}, float64; command: "
                f"`python bench/experiments/{name}.py`\n\n{table}\n\n![plot]({name}.png)\n")


def pyplot():
    """matplotlib.pyplot on the Agg backend, or None (with a note) when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot", file=sys.stderr)
        return None
    return plt


def save_figure(fig, name: str) -> None:
    os.makedirs(TOYS_DIR, exist_ok=True)
    fig.tight_layout()
    fig.savefig(os.path.join(TOYS_DIR, f"{name}.png"), dpi=110)
    print(f"wrote docs/toys/{name}.png")
