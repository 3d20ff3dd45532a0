"""The sibling-method demo's data helpers (the full runs are demo commands, not tests: minutes each)."""
import json

import pytest

from hscr_fast.demo.methods import with_lesion_weights


def test_mmedpo_stand_in_weights_are_region_size_over_mean(tmp_path):
    source = tmp_path / "image.jsonl"
    regions = [40, 80, 120]
    source.write_text("".join(json.dumps({"id": str(i), "image": "a.png", "prompt": "q", "responses": ["x", "x"],
                                          "corruption": {"region_pixels": r}}) + "\n" for i, r in enumerate(regions)))
    weighted = [json.loads(line) for line in with_lesion_weights(source, tmp_path / "w.jsonl").read_text().splitlines()]
    assert [r["weight"] for r in weighted] == pytest.approx([0.5, 1.0, 1.5])
    assert [r["id"] for r in weighted] == ["0", "1", "2"]
