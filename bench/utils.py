"""Shared benchmark helpers: timing, memory, saved-activation bytes, environment stamp, CSV and plot output.

Timing follows the project rules: ``triton.testing.do_bench`` medians on CUDA (it warms up first and times with
device events); on CPU (smoke runs only, no performance claim) a median of ``time.perf_counter`` after a warm-up.
"""

from __future__ import annotations

import csv
import datetime as _dt
import os
import platform
import statistics
import time
from typing import Callable, Dict, Iterable, List

import torch


def bench_ms(fn: Callable[[], object], warmup_ms: int = 50, rep_ms: int = 200) -> float:
    """Median milliseconds of ``fn()``."""
    if torch.cuda.is_available():
        import triton.testing

        return float(triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median"))
    fn()  # warm-up
    times = []
    for _ in range(5):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


class Budget:
    """Wall-clock budget for a benchmark run: cases are ordered most important first, and once the budget is
    spent the remaining ones are skipped (and listed) instead of being killed half-written by an outer timeout."""

    def __init__(self, seconds: float = 0.0):
        self.seconds = float(seconds or 0.0)
        self.start = time.perf_counter()
        self.skipped: List[str] = []

    def spent(self) -> float:
        return time.perf_counter() - self.start

    def allows(self, case: str) -> bool:
        """True if ``case`` may start; otherwise records it as skipped."""
        if self.seconds and self.spent() > self.seconds:
            self.skipped.append(case)
            return False
        return True

    def summary(self) -> str:
        if not self.skipped:
            return f"all cases ran in {self.spent():.0f} s"
        return (f"budget of {self.seconds:.0f} s spent after {self.spent():.0f} s; skipped {len(self.skipped)} "
                f"case(s): " + "; ".join(self.skipped))


def peak_mem_bytes(fn: Callable[[], object]) -> int:
    """Peak CUDA memory allocated by ``fn()`` above what was allocated before it (0 on CPU)."""
    if not torch.cuda.is_available():
        return 0
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - before


def saved_activation_bytes(fn: Callable[[], object], exclude: Iterable[torch.Tensor]) -> int:
    """Bytes of the distinct storages autograd saves during ``fn()`` (the forward), parameters excluded."""
    skip = {t.untyped_storage().data_ptr() for t in exclude}
    seen: Dict[int, int] = {}

    def pack(t):
        st = t.untyped_storage()
        if st.data_ptr() not in skip:
            seen[st.data_ptr()] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())


def environment() -> Dict[str, str]:
    import triton

    dev = torch.cuda.get_device_name() if torch.cuda.is_available() else f"cpu ({platform.processor() or 'unknown'})"
    return {
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "device": dev,
        "torch": torch.__version__,
        "triton": triton.__version__,
        "cuda": str(torch.version.cuda),
    }


def write_csv(path: str, rows: List[Dict[str, object]]) -> None:
    """Append rows (each with the environment stamp) to a CSV, writing the header for a new file."""
    if not rows:
        return
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    env = environment()
    keys = dict.fromkeys(k for r in rows for k in r)  # union, first-seen order (rows may add columns)
    fields = list(env) + [k for k in keys if k not in env]
    new = not os.path.exists(path) or os.path.getsize(path) == 0
    if not new:  # appending: keep the file's own header, so every row lines up with it
        with open(path, newline="") as f:
            header = next(csv.reader(f), None)
        if header:
            lost = [k for k in fields if k not in header]
            if lost:
                print(f"write_csv: {path} has no column for {lost}; those values are not written")
            fields = header
    with open(path, "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields, restval="", extrasaction="ignore")
        if new:
            w.writeheader()
        for r in rows:
            w.writerow({**env, **r})


def markdown_table(rows: List[Dict[str, object]], columns: List[str]) -> str:
    def fmt(v):
        return f"{v:.4g}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(r.get(c, "")) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def plot_ratios(path: str, rows: List[Dict[str, object]], group_key: str, label_key: str, value_key: str,
                title: str) -> bool:
    """Grouped bar chart of ``value_key`` per ``label_key`` within each ``group_key``; False without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception:
        return False
    groups = list(dict.fromkeys(str(r[group_key]) for r in rows))
    labels = list(dict.fromkeys(str(r[label_key]) for r in rows))
    width = 0.8 / max(1, len(labels))
    fig, ax = plt.subplots(figsize=(max(8, len(groups) * 0.9), 4.5))
    for i, lab in enumerate(labels):
        vals = []
        for g in groups:
            match = [r[value_key] for r in rows if str(r[group_key]) == g and str(r[label_key]) == lab]
            vals.append(match[0] if match else float("nan"))
        ax.bar([j + i * width for j in range(len(groups))], vals, width, label=lab)
    ax.axhline(1.0, color="k", lw=0.8)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(groups))])
    ax.set_xticklabels(groups, rotation=45, ha="right", fontsize=7)
    ax.set_ylabel(value_key)
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True
