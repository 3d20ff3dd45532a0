"""Markdown tables and PNG bar charts of Med-VQA metrics: one run, several runs compared, the demo's before/after.

The inputs are the metric dicts of `hscr_fast.evaluation.metrics.compute_metrics` (what `metrics.json` holds):
percentages, and
None for a metric over zero questions. None is shown as "–" in tables and as a missing bar marked "n/a" in plots,
never as 0, which would read as a real score.

Plots use matplotlib's object API on an Agg canvas (no pyplot): nothing here touches the global backend, so importing
this module from a notebook or a training job changes nothing there. Every file is written atomically.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Mapping

from hscr_fast.evaluation.metrics import metrics_to_markdown
from hscr_fast.runtime.io import atomic_output, atomic_write_json, atomic_write_text

# (key in the metrics dict, label in tables and plots), headline metrics first.
HEADLINE_METRICS = (
    ("closed_accuracy", "closed accuracy"),
    ("closed_exact", "closed exact"),
    ("open_recall", "open recall"),
    ("open_exact", "open exact"),
)
# What the demo report plots: the two numbers the HSCR paper's Table 1 reports.
DEMO_PLOT_METRICS = (("closed_accuracy", "closed accuracy (%)"), ("open_recall", "open recall (%)"))
HALLUCINATION_PLOT_METRIC = (("report_hallucination_rate", "reports with a hallucinated finding (%)"),)
WITH_VISUAL = "with visual tokens"
WITHOUT_VISUAL = "without visual tokens"

__all__ = [
    "HEADLINE_METRICS",
    "WITHOUT_VISUAL",
    "WITH_VISUAL",
    "comparison_markdown",
    "demo_report_markdown",
    "plot_grouped_bars",
    "write_comparison",
    "write_demo_report",
    "write_metrics",
]


def _cell(value: float | None) -> str:
    return "–" if value is None else f"{value:.2f}"


def _escape(text: str) -> str:
    return str(text).replace("|", "\\|")


def write_metrics(out_dir: str | Path, metrics: Mapping[str, Any], *, title: str,
                  notes: str = "") -> tuple[Path, Path]:
    """`OUT/metrics.json` (the dict as is) and `OUT/metrics.md` (the headline table and the breakdowns)."""
    out_dir = Path(out_dir)
    json_path, md_path = out_dir / "metrics.json", out_dir / "metrics.md"
    atomic_write_json(json_path, dict(metrics))
    atomic_write_text(md_path, metrics_to_markdown(dict(metrics), title=title) + (f"\n{notes}\n" if notes else ""))
    return json_path, md_path


def comparison_markdown(runs: Mapping[str, Mapping[str, Any]], title: str = "Med-VQA comparison") -> str:
    """One row per run (label → metrics dict), the headline metrics and question counts as columns."""
    header = ["run"] + [label for _, label in HEADLINE_METRICS] + ["closed n", "open n"]
    lines = [f"## {title}", "", "| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 1)]
    for label, metrics in runs.items():
        cells = [_escape(label)] + [_cell(metrics.get(key)) for key, _ in HEADLINE_METRICS]
        cells += [str(metrics.get("num_closed", "–")), str(metrics.get("num_open", "–"))]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot_grouped_bars(path: str | Path, panels: Mapping[str, Mapping[str, Mapping[str, float | None]]], *,
                      title: str, ylabel: str = "%", ylim: tuple[float, float] = (0.0, 100.0)) -> Path:
    """Write a PNG of grouped bar charts, one panel per entry of `panels`.

    `panels[panel_title][group][series] = value`: groups sit along the x axis, each holding one bar per series, with
    the same series colours in every panel and one shared legend. A None value leaves its bar out and writes "n/a".
    An empty panel title draws no title (for a single panel under the figure's title).
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    path = Path(path)
    series_names: list[str] = []
    for groups in panels.values():
        for values in groups.values():
            series_names += [name for name in values if name not in series_names]
    max_groups = max((len(groups) for groups in panels.values()), default=1)
    figure = Figure(figsize=(max(4.5, 1.2 + 0.55 * max_groups * max(len(series_names), 1)) * len(panels), 4.2),
                    dpi=110, layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(1, len(panels), squeeze=False)[0]
    colours = [f"C{index}" for index in range(len(series_names))]
    width = 0.8 / max(len(series_names), 1)
    for axis, (panel_title, groups) in zip(axes, panels.items()):
        for series_index, series in enumerate(series_names):
            offset = (series_index - (len(series_names) - 1) / 2) * width
            for group_index, values in enumerate(groups.values()):
                value = values.get(series)
                x = group_index + offset
                if value is None or (isinstance(value, float) and math.isnan(value)):
                    axis.text(x, ylim[0] + 0.01 * (ylim[1] - ylim[0]), "n/a", ha="center", va="bottom", fontsize=7,
                              color="grey")
                    continue
                bars = axis.bar(x, value, width, color=colours[series_index],
                                label=series if group_index == 0 else None)
                axis.bar_label(bars, fmt="%.1f", fontsize=7, padding=1)
        axis.set_xticks(range(len(groups)), [str(group) for group in groups])
        axis.set_xlim(-0.5, len(groups) - 0.5)  # fixed, so a group with no bars keeps its slot
        if panel_title:
            axis.set_title(panel_title)
        axis.set_ylabel(ylabel)
        axis.set_ylim(*ylim)
        axis.grid(axis="y", alpha=0.3)
        axis.set_axisbelow(True)
    handles, labels = axes[0].get_legend_handles_labels()
    if not handles:  # the first panel may have only n/a values; take the legend from any panel that has bars
        for axis in axes[1:]:
            handles, labels = axis.get_legend_handles_labels()
            if handles:
                break
    if handles:
        figure.legend(handles, labels, loc="outside lower center", ncols=min(len(labels), 4), fontsize=8)
    figure.suptitle(title)
    with atomic_output(path) as temporary:
        figure.savefig(temporary, format="png")
    return path


def write_comparison(out_dir: str | Path, runs: Mapping[str, Mapping[str, Any]],
                     name: str = "comparison") -> tuple[Path, Path]:
    """`OUT/{name}.md` (table) and `OUT/{name}.png` (bar chart): the headline metrics of several runs side by side."""
    if not runs:
        raise ValueError("nothing to compare: no runs given")
    out_dir = Path(out_dir)
    md_path, png_path = out_dir / f"{name}.md", out_dir / f"{name}.png"
    atomic_write_text(md_path, comparison_markdown(runs))
    groups = {label: {run: metrics.get(key) for run, metrics in runs.items()} for key, label in HEADLINE_METRICS}
    plot_grouped_bars(png_path, {"": groups}, title="Med-VQA comparison")
    return md_path, png_path


def _check_demo_results(results: Mapping[str, Mapping[str, Mapping[str, Any]]]) -> None:
    if not results:
        raise ValueError("write_demo_report: no results given")
    for label, conditions in results.items():
        unknown = set(conditions) - {WITH_VISUAL, WITHOUT_VISUAL}
        if unknown or not conditions:
            raise ValueError(f"write_demo_report: results[{label!r}] must map {WITH_VISUAL!r} and/or "
                             f"{WITHOUT_VISUAL!r} to metrics dicts; got keys {sorted(conditions)}")


def _has_reports(results: Mapping[str, Mapping[str, Mapping[str, Any]]]) -> bool:
    return any("num_reports" in metrics for conditions in results.values() for metrics in conditions.values())


def demo_report_markdown(results: Mapping[str, Mapping[str, Mapping[str, Any]]]) -> str:
    """The demo's table: one row per (model, visual condition), then how much the visual tokens add per model. When
    the data has report questions, the share of reports with a hallucinated finding is a column too."""
    _check_demo_results(results)
    reports = _has_reports(results)
    lines = [
        "## Demo: Med-VQA on the phantom test set, before and after alignment",
        "",
        "Closed accuracy and open recall as LLaVA-Med computes them (substring / word recall); exact match alongside. "
        "\"Without visual tokens\" generates from the prompt with the image removed: what the model answers from the "
        "text alone.",
        "",
        "| model | visual tokens | " + " | ".join(label for _, label in HEADLINE_METRICS) + " | closed n | open n |"
        + (" hallucinating reports | reports |" if reports else ""),
        "|---|---|" + "---:|" * (len(HEADLINE_METRICS) + 2 + 2 * reports),
    ]
    for label, conditions in results.items():
        for condition in (WITH_VISUAL, WITHOUT_VISUAL):
            if condition not in conditions:
                continue
            metrics = conditions[condition]
            cells = [_escape(label), condition.removesuffix(" visual tokens")]
            cells += [_cell(metrics.get(key)) for key, _ in HEADLINE_METRICS]
            cells += [str(metrics.get("num_closed", "–")), str(metrics.get("num_open", "–"))]
            if reports:
                cells += [_cell(metrics.get("report_hallucination_rate")), str(metrics.get("num_reports", "–"))]
            lines.append("| " + " | ".join(cells) + " |")
    gains = [(label, conditions) for label, conditions in results.items()
             if WITH_VISUAL in conditions and WITHOUT_VISUAL in conditions]
    if gains:
        lines += ["", "Gain from the visual tokens (with − without, percentage points): how much the answers depend "
                      "on the image.", "",
                  "| model | " + " | ".join(label for _, label in HEADLINE_METRICS) + " |",
                  "|---|" + "---:|" * len(HEADLINE_METRICS)]
        for label, conditions in gains:
            cells = [_escape(label)]
            for key, _ in HEADLINE_METRICS:
                with_value, without_value = conditions[WITH_VISUAL].get(key), conditions[WITHOUT_VISUAL].get(key)
                cells.append("–" if with_value is None or without_value is None
                             else f"{with_value - without_value:+.2f}")
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_demo_report(out_dir: str | Path, results: Mapping[str, Mapping[str, Mapping[str, Any]]],
                      name: str = "demo_report") -> tuple[Path, Path]:
    """The demo's before/after report: `OUT/{name}.md` and `OUT/{name}.png`.

    `results[model label][condition] = metrics dict`, the labels in display order (e.g. "before HSCR", "after HSCR"),
    the conditions `WITH_VISUAL` ("with visual tokens") and/or `WITHOUT_VISUAL` ("without visual tokens"). The PNG
    has one panel per metric (closed accuracy, open recall), the models along the x axis and one bar per condition.
    """
    _check_demo_results(results)
    out_dir = Path(out_dir)
    md_path, png_path = out_dir / f"{name}.md", out_dir / f"{name}.png"
    atomic_write_text(md_path, demo_report_markdown(results))
    panels = {
        metric_label: {label: {condition: conditions[condition].get(key) for condition in (WITH_VISUAL, WITHOUT_VISUAL)
                               if condition in conditions}
                       for label, conditions in results.items()}
        for key, metric_label in DEMO_PLOT_METRICS + (HALLUCINATION_PLOT_METRIC if _has_reports(results) else ())
    }
    plot_grouped_bars(png_path, panels, title="Demo: phantom test set, before/after alignment")
    return md_path, png_path
