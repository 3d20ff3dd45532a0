"""The bad-input catalogue: each command's `main` on each bad input gives its exit code (2: bad input), ONE line on
stderr naming the file, record or flag and what to do, and changes nothing that existed before (every file under
the test's folder keeps its bytes; nothing is deleted)."""
import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pytest

pytestmark = pytest.mark.usefixtures("one_cpu_thread")  # see conftest


@dataclass
class World:
    """Small valid inputs for every command, in one folder; each case breaks one thing."""
    root: Path
    model: Path
    sft: Path  # LLaVA-Med JSON, one line (like the real VQA-RAD / SLAKE files)
    images: Path
    preferences: Path

    def snapshot(self) -> dict[str, str]:
        return {str(path.relative_to(self.root)): hashlib.sha256(path.read_bytes()).hexdigest()
                for path in sorted(self.root.rglob("*")) if path.is_file()}


@pytest.fixture
def world(tmp_path, tiny_model_dir, make_images, preference_lists):
    import shutil

    root = tmp_path / "world"
    root.mkdir()
    preference_lists(root, {"prefs.jsonl": 4})
    model = root / "model"
    shutil.copytree(tiny_model_dir, model)
    records = [{"id": f"q{index}", "image": f"img{index}.png",
                "conversations": [{"from": "human", "value": "<image>\nIs there a lesion?"},
                                  {"from": "gpt", "value": "yes, in the left lung"}]} for index in range(4)]
    sft = root / "sft.json"
    sft.write_text(json.dumps(records))  # no newline: one line, as VQA-RAD ships
    return World(root, model, sft, root / "images", root / "prefs.jsonl")


@dataclass
class Case:
    command: str  # hscr_fast.<command>.main
    argv: Callable[[World], list[str]]
    message: str  # regex found in the one "error: " line
    code: int = 2
    prepare: Callable[[World], None] = field(default=lambda world: None)


CASES = {
    # An output that is an input is refused before anything is opened for writing.
    "generate-out-is-the-data-file": Case(
        "generate", lambda w: ["--model", str(w.model), "--data", str(w.sft), "--image-folder", str(w.images),
                               "--out", str(w.sft)],
        r"--out .*sft\.json is the --data input .*choose another --out"),
    "generate-out-inside-the-model": Case(
        "generate", lambda w: ["--model", str(w.model), "--data", str(w.sft), "--out", str(w.model / "config.json")],
        r"--out .*config\.json lies inside the --model input"),
    # A finished run is neither overwritten nor mixed into without --resume or --overwrite.
    "train-over-a-finished-run": Case(
        "train", lambda w: ["--model", str(w.model), "--preferences", str(w.preferences), "--image-folder",
                            str(w.images), "--deepspeed", "none", "--out", str(w.root / "run")],
        r"--out .*run already holds a run \(checkpoints, metrics.jsonl\); add --resume to continue it, "
        r"--overwrite to replace it",
        prepare=lambda w: previous_run(w.root / "run")),
    # Nothing to train on is a failure, not a success with an empty file.
    "generate-every-record-rejected": Case(
        "generate", lambda w: ["--model", str(w.model), "--data", str(w.root / "gone.json"), "--image-folder",
                               str(w.images), "--out", str(w.root / "prefs-out.jsonl")],
        r"no preference list written: all 2 selected records were skipped \(missing_image 2\); the reasons per "
        r"record are in .*prefs-out\.skipped\.jsonl",
        prepare=lambda w: (w.root / "gone.json").write_text(json.dumps([
            {"id": f"x{index}", "image": f"gone{index}.png", "conversations": [
                {"from": "human", "value": "<image>\nIs there a lesion?"}, {"from": "gpt", "value": "yes"}]}
            for index in range(2)]))),
}


def previous_run(out: Path) -> None:
    (out / "checkpoints" / "step-20").mkdir(parents=True)
    (out / "checkpoints" / "latest").write_text("step-20")
    (out / "metrics.jsonl").write_text("".join(json.dumps({"step": step, "loss": 0.5}) + "\n" for step in range(20)))


def run_command(command: str, argv: list[str], capsys) -> tuple[int, str]:
    import importlib

    main = importlib.import_module(f"hscr_fast.{command}").main
    try:
        code = main(argv)
    except SystemExit as exit_:
        code = exit_.code if isinstance(exit_.code, int) else 1
        if isinstance(exit_.code, str):
            print(exit_.code, file=__import__("sys").stderr)
    return code, capsys.readouterr().err


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_gives_one_line_and_changes_nothing(name, world, capsys):
    case = CASES[name]
    case.prepare(world)
    before = world.snapshot()
    code, stderr = run_command(case.command, case.argv(world), capsys)
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert code == case.code, stderr[-2000:]
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1 and re.search(case.message, errors[0]), lines[-5:]
    after = world.snapshot()
    assert {path: digest for path, digest in after.items() if path in before} == before
