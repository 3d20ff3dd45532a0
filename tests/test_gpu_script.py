"""bench/gpu_run.py (what bench/gpu.sh runs on a GPU machine) works where it can be checked without one: argument
handling, the parts' test selection, and the JSON it writes (in --smoke mode, which only collects each part's tests)."""
import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def gpu_run():
    spec = importlib.util.spec_from_file_location("gpu_run", ROOT / "bench" / "gpu_run.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_part_selects_existing_test_files_within_nine_minutes(gpu_run):
    for files, _ in gpu_run.PARTS.values():
        for file in files:
            assert (ROOT / file).is_file(), file
    assert sum(limit for _, limit in gpu_run.PARTS.values()) <= 9 * 60


def test_unknown_part_and_missing_gpu_are_refused(gpu_run, tmp_path, capsys):
    with pytest.raises(SystemExit) as refused:
        gpu_run.main(["--smoke", "--parts", "step,nonsense", "--out", str(tmp_path)])
    assert refused.value.code == 2 and "nonsense" in capsys.readouterr().err
    if gpu_run.device_description()["cuda_device"] is None:
        assert gpu_run.main(["--parts", "step", "--out", str(tmp_path)]) == 2
        assert "--smoke" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())  # nothing written for a refused run


def test_smoke_run_writes_one_json_with_every_selected_part(gpu_run, tmp_path, monkeypatch):
    (tmp_path / "tests").mkdir()
    (tmp_path / "tests" / "test_small.py").write_text("def test_one():\n    assert True\n")
    (tmp_path / "tests" / "test_broken.py").write_text("import module_that_does_not_exist\n")
    monkeypatch.setattr(gpu_run, "ROOT", tmp_path)
    monkeypatch.setattr(gpu_run, "PARTS", {"good": (["tests/test_small.py"], 60),
                                           "bad": (["tests/test_broken.py"], 60)})
    out = tmp_path / "out"
    assert gpu_run.main(["--smoke", "--parts", "good,bad", "--out", str(out)]) == 1  # one part failed to collect
    (report_path,) = out.glob("gpu-*.json")
    report = json.loads(report_path.read_text())
    assert report["smoke"] is True and set(report["versions"]) >= {"torch", "transformers", "trl", "liger-kernel"}
    assert list(report["parts"]) == ["good", "bad"]
    assert report["parts"]["good"]["rc"] == 0 and report["parts"]["bad"]["rc"] != 0
    assert "test_small.py::test_one" in (out / "good.log").read_text()
