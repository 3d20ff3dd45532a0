"""The trainer's metrics log (JSONL: a line per logged optimizer step, and one per held-out evaluation) and its plot
(PNG of the curves, held-out values drawn beside the training ones)."""
from __future__ import annotations

import json
import math
from pathlib import Path

from hscr_fast.runtime.io import atomic_output, read_jsonl

PLOTTED = [("loss", "preference loss (MLPO: L_E + L_I)"), ("loss_explicit", "L_E"), ("loss_implicit", "L_I"),
           ("margin_explicit", "explicit reward margin"), ("margin_implicit", "implicit reward margin"),
           ("accuracy_explicit", "explicit accuracy"), ("accuracy_implicit", "implicit accuracy"),
           ("token_kl", "token KL to reference"), ("chosen_nll", "NLL of y_w per token"), ("lr", "learning rate"),
           ("tokens_per_second", "tokens/s")]


class MetricsLog:
    """Append-only JSONL of per-step metrics. Reopened for a resumed run, it drops the steps after the checkpoint
    (they will be recomputed), so the log of a resumed run equals the log of an uninterrupted one."""

    def __init__(self, path: str | Path, *, resume_after_step: int | None = None, enabled: bool = True):
        self.path = Path(path)
        self.enabled = enabled
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_after_step is None:
            self.path.write_text("")
        elif self.path.is_file():
            kept = [row for row in _read_tolerant(self.path) if row["step"] <= resume_after_step]
            with atomic_output(self.path) as temporary:
                temporary.write_text("".join(json.dumps(row) + "\n" for row in kept))

    def append(self, row: dict) -> None:
        if not self.enabled:
            return
        with self.path.open("a") as handle:
            handle.write(json.dumps(strict_json_values(row), allow_nan=False) + "\n")
            handle.flush()


def strict_json_values(row: dict) -> dict:
    """NaN and ±Infinity become null: JSON has no such numbers, and strict readers reject Python's bare `NaN`."""
    return {key: None if isinstance(value, float) and not math.isfinite(value) else value
            for key, value in row.items()}


def _read_tolerant(path: Path) -> list[dict]:
    """Rows of a metrics log; a torn last line (a crash mid-write) is dropped."""
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            break
    return rows


def plot_training_curves(metrics_path: str | Path, out_path: str | Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_jsonl(metrics_path)
    # Held-out rows (eval_<key>, see hscr_fast.training.heldout) share the panel of their training metric.
    present = [(key, label) for key, label in PLOTTED
               if any(_finite(row.get(key)) or _finite(row.get(f"eval_{key}")) for row in rows)]
    columns = 3
    rows_needed = max(1, math.ceil(len(present) / columns))
    figure, axes = plt.subplots(rows_needed, columns, figsize=(4.2 * columns, 3.0 * rows_needed), squeeze=False)
    for axis, (key, label) in zip(axes.flat, present):
        for name, style in ((key, dict(lw=1.4, label="train")),
                            (f"eval_{key}", dict(lw=1.4, marker="o", ms=3, label="held-out"))):
            points = [(row["step"], row[name]) for row in rows if _finite(row.get(name))]
            if points:
                axis.plot([p[0] for p in points], [p[1] for p in points], **style)
        if any(_finite(row.get(f"eval_{key}")) for row in rows):
            axis.legend(fontsize=7)
        axis.set_title(label, fontsize=10)
        axis.set_xlabel("optimizer step", fontsize=8)
        axis.grid(alpha=0.3)
    for axis in list(axes.flat)[len(present):]:
        axis.axis("off")
    figure.tight_layout()
    with atomic_output(out_path) as temporary:
        figure.savefig(temporary, format="png", dpi=110)
    plt.close(figure)
    return Path(out_path)


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)
