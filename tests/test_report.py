"""hscr_fast.evaluation.report: the demo's before/after report, the run comparison and metrics files — numbers in the
tables,
valid PNGs, no temporary files left behind, None shown as missing rather than 0."""
import json

import pytest
from PIL import Image

from hscr_fast.evaluation.report import (
    WITH_VISUAL,
    WITHOUT_VISUAL,
    comparison_markdown,
    demo_report_markdown,
    plot_grouped_bars,
    write_comparison,
    write_demo_report,
    write_metrics,
)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _metrics(closed, open_recall, closed_exact=None, open_exact=None, num_closed=40, num_open=24):
    return {"closed_accuracy": closed, "closed_accuracy_yes_no": closed, "open_recall": open_recall,
            "closed_exact": closed if closed_exact is None else closed_exact,
            "open_exact": open_exact, "num_closed": num_closed, "num_open": num_open,
            "num_questions": num_closed + num_open}


DEMO_RESULTS = {
    "before HSCR": {WITH_VISUAL: _metrics(62.5, 30.0, 55.0, 10.0), WITHOUT_VISUAL: _metrics(50.0, 20.25, 50.0, 5.0)},
    "after HSCR": {WITH_VISUAL: _metrics(75.0, 41.5, 70.0, 20.0), WITHOUT_VISUAL: _metrics(52.5, 22.0, 50.0, 7.5)},
}


def _assert_png(path, min_width=300):
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    with Image.open(path) as image:
        image.verify()
    with Image.open(path) as image:
        assert image.format == "PNG" and image.width >= min_width and image.height >= 200
        # not a blank canvas: bars of several colours were drawn
        assert len(image.convert("RGB").getcolors(maxcolors=1 << 16) or range(1 << 16)) > 10


def _no_temporaries(folder):
    assert not [path.name for path in folder.iterdir() if path.name.endswith(".tmp")]


def test_demo_report_table_and_chart(tmp_path):
    md_path, png_path = write_demo_report(tmp_path / "report", DEMO_RESULTS)
    assert (md_path.name, png_path.name) == ("demo_report.md", "demo_report.png")
    table = md_path.read_text()
    # rows in the order given, with every headline metric and the counts
    assert "| before HSCR | with | 62.50 | 55.00 | 30.00 | 10.00 | 40 | 24 |" in table
    assert "| after HSCR | without | 52.50 | 50.00 | 22.00 | 7.50 | 40 | 24 |" in table
    assert table.index("| before HSCR | with") < table.index("| before HSCR | without") < table.index("| after HSCR")
    # the visual-token gain, with minus without
    assert "| before HSCR | +12.50 | +5.00 | +9.75 | +5.00 |" in table
    assert "| after HSCR | +22.50 | +20.00 | +19.50 | +12.50 |" in table
    _assert_png(png_path, min_width=600)
    _no_temporaries(tmp_path / "report")


def test_demo_report_with_missing_values_and_one_condition(tmp_path):
    results = {"before HSCR": {WITH_VISUAL: _metrics(60.0, None, num_open=0)},
               "after HSCR": {WITH_VISUAL: _metrics(70.0, None, num_open=0)}}
    md_path, png_path = write_demo_report(tmp_path, results, name="closed_only")
    table = md_path.read_text()
    assert "| before HSCR | with | 60.00 | 60.00 | – | – | 40 | 0 |" in table
    assert "Gain from the visual tokens" not in table  # nothing to subtract
    _assert_png(png_path)


@pytest.mark.parametrize("results, match", [
    ({}, "no results"),
    ({"before HSCR": {"with image": _metrics(1, 2)}}, "'with visual tokens'"),
    ({"before HSCR": {}}, "got keys"),
])
def test_demo_report_rejects_malformed_results(tmp_path, results, match):
    with pytest.raises(ValueError, match=match):
        write_demo_report(tmp_path, results)
    assert not any(tmp_path.iterdir())


def test_comparison_table_and_chart(tmp_path):
    runs = {"runs/base": _metrics(62.5, 30.0, 55.0, 10.0), "runs/hscr|v2": _metrics(75.0, None, 70.0, None)}
    md_path, png_path = write_comparison(tmp_path, runs)
    table = md_path.read_text()
    assert table == comparison_markdown(runs)
    assert "| runs/base | 62.50 | 55.00 | 30.00 | 10.00 | 40 | 24 |" in table
    assert "| runs/hscr\\|v2 | 75.00 | 70.00 | – | – | 40 | 24 |" in table  # "|" escaped, None as –
    _assert_png(png_path)
    _no_temporaries(tmp_path)
    with pytest.raises(ValueError, match="nothing to compare"):
        write_comparison(tmp_path, {})


def test_write_metrics_round_trips(tmp_path):
    metrics = {**_metrics(62.5, 30.0), "by_organ": {"CHEST": _metrics(50.0, 25.0, num_closed=2, num_open=2)},
               "run": {"model": "m"}}
    json_path, md_path = write_metrics(tmp_path, metrics, title="tiny run", notes="run by a test")
    assert json.loads(json_path.read_text()) == metrics
    text = md_path.read_text()
    assert text.startswith("## tiny run") and "### by organ" in text and text.rstrip().endswith("run by a test")


def test_grouped_bars_panel_without_any_value(tmp_path):
    """A panel whose values are all None still draws (n/a marks) and the legend comes from another panel."""
    path = plot_grouped_bars(tmp_path / "bars.png", {"closed": {"a": {"s1": None, "s2": None}},
                                                     "open": {"a": {"s1": 10.0, "s2": 90.0}}}, title="t")
    _assert_png(path)
    assert demo_report_markdown(DEMO_RESULTS).startswith("## Demo: Med-VQA on the phantom test set")
