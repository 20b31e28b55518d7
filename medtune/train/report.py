"""What a training run reports: metrics.jsonl, loss.png, the lines above the progress bar, and Ctrl-C."""

from __future__ import annotations

import json
from pathlib import Path

from medtune.core import fsutil


class MetricsLog:
    """Appends one JSON object per report to metrics.jsonl (flushed, so a crash keeps what was logged)."""

    def __init__(self, path: Path, truncate: bool = True, enabled: bool = True):
        self.path = path
        self.enabled = enabled  # False on every process but the first of a distributed run
        self.rows: list[dict] = []
        if enabled and truncate and path.exists():
            path.unlink()

    def keep_until(self, step: int) -> None:
        """On resume: drop what was logged after the checkpoint, so the log reads as one unbroken run."""
        if not self.path.exists() or not self.enabled:
            return
        from medtune.core.jsonl import read_jsonl

        rows = read_jsonl(self.path, skip_bad=True)  # skips a line cut by a crash
        kept = [row for row in rows if row.get("step", 0) <= step and "test_loss" not in row]
        fsutil.write_text(self.path, "".join(json.dumps(r) + "\n" for r in kept))
        self.rows = kept

    def write(self, row: dict) -> None:
        self.rows.append(row)
        if not self.enabled:
            return
        from medtune.core.safety import append_text

        append_text(self.path, json.dumps(row) + "\n")  # never through a symlink at metrics.jsonl


def plot_losses(rows: list[dict], path: Path, title: str = "") -> Path | None:
    train = [(r["step"], r["train_loss"]) for r in rows if "train_loss" in r]
    val = [(r["step"], r["val_loss"]) for r in rows if "val_loss" in r]
    if not train and not val:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pref = any("margin" in r or "val_margin" in r for r in rows)  # preference methods: a second panel
    fig, axes = plt.subplots(1, 2 if pref else 1, figsize=(12 if pref else 7, 4), dpi=110, squeeze=False)
    ax = axes[0][0]
    if train:
        ax.plot(*zip(*train), label="train loss", color="#1f77b4", linewidth=1.2)
    if val:
        ax.plot(*zip(*val), label="validation loss", color="#d62728", marker="o", linewidth=1.5)
    ax.set_xlabel("step")
    ax.set_ylabel("loss" if pref else "loss (nats/token)")
    ax.set_title(title or "medtune training")
    ax.grid(alpha=0.3)
    ax.legend()
    if pref:
        _plot_preference(axes[0][1], rows)
    fig.tight_layout()
    with fsutil.atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return path


def _plot_preference(ax, rows: list[dict]) -> None:
    """Reward margin (left axis) and preference accuracy (right axis), train and validation."""
    for key, label, style in (("margin", "train margin", "-"), ("val_margin", "validation margin", "o-")):
        pts = [(r["step"], r[key]) for r in rows if key in r]
        if pts:
            ax.plot(*zip(*pts), style, label=label, color="#2ca02c", linewidth=1.2, alpha=1 if "val" in key else 0.6)
    ax.set_xlabel("step")
    ax.set_ylabel("reward margin (chosen - rejected)")
    ax.grid(alpha=0.3)
    acc = ax.twinx()
    for key, label, style in (("accuracy", "train accuracy", "-"), ("val_accuracy", "validation accuracy", "s-")):
        pts = [(r["step"], r[key]) for r in rows if key in r]
        if pts:
            acc.plot(*zip(*pts), style, label=label, color="#9467bd", linewidth=1.2, alpha=1 if "val" in key else 0.6)
    acc.set_ylim(-0.05, 1.05)
    acc.set_ylabel("preference accuracy")
    lines = ax.get_legend_handles_labels()[0] + acc.get_legend_handles_labels()[0]
    ax.legend(lines, [h.get_label() for h in lines], loc="lower right", fontsize=8)
    ax.set_title("preference: margin and accuracy")


class StopOnSignal:
    """Ctrl-C (or SIGTERM) asks a training loop to stop: the step under way finishes, the loop saves a
    checkpoint at that clean boundary and exits; a second Ctrl-C aborts at once (the last periodic
    checkpoint remains). Handlers are only installed from the main thread; `restore()` puts the
    previous ones back. Shared by every backend."""

    def __init__(self, progress=None):
        self.asked = False
        self._progress = progress
        self._previous: dict = {}

    def _handle(self, signum, frame):
        if self.asked:
            raise KeyboardInterrupt
        self.asked = True
        if self._progress is not None:
            log_line(self._progress, "stopping after this step and saving a checkpoint (Ctrl-C again to abort now)")

    def install(self) -> "StopOnSignal":
        import signal
        import threading

        if threading.current_thread() is threading.main_thread():
            self._previous = {sig: signal.signal(sig, self._handle) for sig in (signal.SIGINT, signal.SIGTERM)}
        return self

    def restore(self) -> None:
        import signal

        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}


def log_line(progress, line: str) -> None:
    """A plain line above the bar; when stderr is not a terminal (nohup, CI) it is the only record."""
    progress.console.print(line, markup=False, highlight=False)


def log_validation(progress, it: int, steps: int, run: dict, loss: float) -> None:
    """The line every backend prints after a validation pass."""
    tl = run["train_loss"]
    log_line(
        progress,
        f"step {it}/{steps}: train loss {'-' if tl is None else f'{tl:.3f}'}, val loss {loss:.3f}"
        + (f", {run['tokens_seen'] / run['t_train']:.0f} tok/s" if run["t_train"] else ""),
    )
