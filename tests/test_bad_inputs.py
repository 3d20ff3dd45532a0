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
from helpers import write_preference_lists

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
def world(tmp_path, tiny_model_dir):
    import shutil

    root = tmp_path / "world"
    root.mkdir()
    write_preference_lists(root, {"prefs.jsonl": 4})
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
        "train", lambda w: train_argv(w),
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
    # Image paths stay inside --image-folder (unless --allow-images-outside-folder): '..', absolute, symlinks out.
    "train-image-path-with-dotdot": Case(
        "train", lambda w: ["--model", str(w.model), "--preferences", str(w.root / "escape.jsonl"), "--image-folder",
                            str(w.images), "--deepspeed", "none", "--out", str(w.root / "run")],
        r"escape\.jsonl:2 \(id 'e1'\): image path '\.\./outside\.png' leads outside the image folder .* pass "
        r"--allow-images-outside-folder",
        prepare=lambda w: escaping_preferences(w, "../outside.png")),
    "train-image-symlink-out-of-the-folder": Case(
        "train", lambda w: ["--model", str(w.model), "--preferences", str(w.root / "escape.jsonl"), "--image-folder",
                            str(w.images), "--deepspeed", "none", "--out", str(w.root / "run")],
        r"escape\.jsonl:2 \(id 'e1'\): image path 'link\.png' leads outside the image folder",
        prepare=lambda w: (escaping_preferences(w, "link.png"),
                           (w.images / "link.png").symlink_to(w.root / "outside.png"))),
    "evaluate-absolute-image-path": Case(
        "evaluate", lambda w: ["--model", str(w.model), "--data", str(w.root / "escape.json"), "--image-folder",
                               str(w.images), "--out", str(w.root / "eval"), "--no-progress"],
        r"escape\.json: record 1 \(id 'q1'\): image path '/.*outside\.png' leads outside the image folder",
        prepare=lambda w: escaping_sft(w, str(w.root / "outside.png"))),
    "generate-every-image-outside-the-folder": Case(
        "generate", lambda w: ["--model", str(w.model), "--data", str(w.root / "escape.json"), "--image-folder",
                               str(w.images), "--out", str(w.root / "prefs-out.jsonl")],
        r"no preference list written: all 2 selected records were skipped \(image_outside_folder 2\)",
        prepare=lambda w: escaping_sft(w, "../outside.png", every=True)),
    # Known before the weights load: incomplete checkpoints, unwritable outputs, unusable DeepSpeed settings.
    "train-model-without-weights": Case(
        "train", lambda w: train_argv(w), r"model: config.json but no weights \(model.safetensors, .*incomplete",
        prepare=lambda w: (w.model / "model.safetensors").unlink()),
    "generate-truncated-weights": Case(
        "generate", lambda w: ["--model", str(w.model), "--data", str(w.sft), "--out", str(w.root / "p.jsonl")],
        r"model/model\.safetensors: not a complete safetensors file \(.*\); it is truncated or corrupt",
        prepare=lambda w: truncate(w.model / "model.safetensors")),
    "evaluate-out-under-a-file": Case(
        "evaluate", lambda w: ["--model", str(w.model), "--data", str(w.sft), "--image-folder", str(w.images),
                               "--out", str(w.sft / "eval"), "--no-progress"],
        r"--out .*sft\.json/eval: .*sft\.json is a file, so no folder can be made under it"),
    "train-out-is-a-file": Case(
        "train", lambda w: train_argv(w, "--out", str(w.preferences)),
        r"--out .*prefs\.jsonl is a file; give a folder"),
    "train-deepspeed-not-a-file": Case(
        "train", lambda w: train_argv(w, "--deepspeed", "zero9"),
        r"--deepspeed 'zero9': not 'zero2', 'zero3', 'none' or an existing DeepSpeed JSON file"),
    "train-deepspeed-malformed-json": Case(
        "train", lambda w: train_argv(w, "--deepspeed", str(w.root / "ds.json")),
        r"--deepspeed .*ds\.json: not valid JSON \(Expecting",
        prepare=lambda w: (w.root / "ds.json").write_text('{"zero_optimization": {"stage": 2,}}')),
    "train-deepspeed-impossible-settings": Case(
        "train", lambda w: train_argv(w, "--deepspeed", str(w.root / "ds.json")),
        r"--deepspeed .*ds\.json: train_micro_batch_size_per_gpu is 4 but --per-device-batch-size gives 2; fp16 is "
        r"enabled: .*; zero_optimization.stage is 0: .*use --deepspeed none",
        prepare=lambda w: (w.root / "ds.json").write_text(json.dumps(
            {"train_micro_batch_size_per_gpu": 4, "fp16": {"enabled": True}, "zero_optimization": {"stage": 0}}))),
    # A flag value the command cannot take: one line from every command, before anything is read.
    "generate-flag-not-a-number": Case(
        "generate", lambda w: ["--model", str(w.model), "--data", str(w.sft), "--top-n", "ten"],
        r"argument --top_n/--top-n: invalid int value: 'ten' \(all flags: python -m hscr_fast.generate --help\)"),
    "evaluate-flag-not-a-choice": Case(
        "evaluate", lambda w: ["--model", str(w.model), "--data", str(w.sft), "--visual", "partly"],
        r"argument --visual: invalid choice: 'partly'"),
    "train-unknown-flag": Case(
        "train", lambda w: train_argv(w, "--learning-rte", "1e-5"), r"unrecognized arguments: --learning-rte 1e-5"),
    "generate-setting-out-of-range": Case(
        "generate", lambda w: ["--model", str(w.model), "--data", str(w.sft), "--drop-ratio", "1.5"],
        r"--drop-ratio must be in \[0, 1\), got 1.5"),
}


def train_argv(world: World, *extra: str) -> list[str]:
    argv = {"--model": str(world.model), "--preferences": str(world.preferences), "--image-folder": str(world.images),
            "--deepspeed": "none", "--out": str(world.root / "run")}
    argv.update(zip(extra[::2], extra[1::2]))
    return [item for pair in argv.items() for item in pair]


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])


def escaping_preferences(world: World, image: str) -> None:
    """A copy of the preference lists whose second record names `image` (and an image file outside the folder)."""
    world.images.parent.joinpath("outside.png").write_bytes((world.images / "img0.png").read_bytes())
    lines = world.preferences.read_text().splitlines()
    second = json.loads(lines[1])
    second.update(id="e1", image=image)
    lines[1] = json.dumps(second)
    (world.root / "escape.jsonl").write_text("\n".join(lines) + "\n")


def escaping_sft(world: World, image: str, every: bool = False) -> None:
    world.images.parent.joinpath("outside.png").write_bytes((world.images / "img0.png").read_bytes())
    records = json.loads(world.sft.read_text())[:2]
    for record in records if every else records[1:]:
        record["image"] = image
    (world.root / "escape.json").write_text(json.dumps(records))


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


def test_images_outside_the_folder_are_accepted_with_the_opt_out(world):
    """--allow-images-outside-folder (here its library form): the same records load, images resolved as given."""
    from hscr_fast.data.images import image_in_folder
    from hscr_fast.evaluation.run import load_eval_records
    from hscr_fast.training.data import validate_preferences

    escaping_preferences(world, "../outside.png")
    records = validate_preferences(world.root / "escape.jsonl", world.images, allow_images_outside_folder=True)
    assert records[1].image == "../outside.png"
    escaping_sft(world, str(world.root / "outside.png"))
    assert len(load_eval_records(world.root / "escape.json", world.images, allow_images_outside_folder=True)) == 2
    assert image_in_folder(world.images, "sub/../img0.png") == world.images / "sub/../img0.png"  # stays inside
