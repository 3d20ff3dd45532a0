"""The flags of `python -m hscr_fast.generate`, `python -m hscr_fast.evaluate` and the sibling data builders
(`hscr_fast.preferences.image_preferences`, `.minimal_edits`), now dataclasses parsed by HfArgumentParser: every flag
the hand-written argparse parsers had keeps its name, default, choices and type, and a bad value is refused in one
line with exit 2 (as train's are)."""
import dataclasses
import typing

import pytest

from hscr_fast import evaluate, generate, train
from hscr_fast.evaluation.config import EvaluateConfig
from hscr_fast.preferences import image_preferences, minimal_edits
from hscr_fast.preferences.config import GenerateConfig, SelfContrastConfig
from hscr_fast.runtime.flags import parse_flags

SWITCH = object()  # a flag given without a value

# What the hand-written parsers gave: flag -> (destination, default, a value as typed, that value parsed).
GENERATE_FLAGS = {
    "--model": ("model", None, "m", "m"),
    "--data": ("data", None, "sft.json", "sft.json"),
    "--image-folder": ("image_folder", None, "images", "images"),
    "--out": ("out", "preferences.jsonl", "o.jsonl", "o.jsonl"),
    "--num-samples": ("num_samples", 2000, "7", 7),
    "--allow-images-outside-folder": ("allow_images_outside_folder", False, SWITCH, True),
    "--seed": ("seed", 0, "3", 3),
    "--perturbation": ("perturbation", "visual-token", "latent", "latent"),
    "--drop-ratio": ("drop_ratio", 0.7, "0.25", 0.25),
    "--dropout-mode": ("dropout_mode", "remove", "mask", "mask"),
    "--sensitivity": ("sensitivity", "logprob", "logit", "logit"),
    "--beta": ("beta", 0.9, "0.5", 0.5),
    "--top-n": ("top_n", 10, "4", 4),
    "--min-sensitivity": ("min_sensitivity", 0.0, "0.3", 0.3),
    "--literal-top-n": ("literal_top_n", False, SWITCH, True),
    "--alpha": ("alpha", 0.1, "0.2", 0.2),
    "--replacement": ("replacement", "deprived-contrast-uncut", "pdiff-ascending", "pdiff-ascending"),
    "--num-candidates": ("num_candidates", 8, "5", 5),
    "--num-variants": ("num_variants", 5, "3", 3),
    "--num-alternatives": ("num_alternatives", 2, "1", 1),
    "--mode": ("mode", "parallel", "sequential", "sequential"),
    "--include-punctuation": ("include_punctuation", False, SWITCH, True),
    "--max-length": ("max_length", None, "128", 128),
    "--num-dispreferred": ("num_dispreferred", 3, "2", 2),
    "--min-gap": ("min_gap", 0.1, "0.05", 0.05),
    "--similarity-model": ("similarity_model", None, "minilm", "minilm"),
    "--batch-size": ("batch_size", 8, "4", 4),
    "--device": ("device", "auto", "cpu", "cpu"),
    "--dtype": ("dtype", "auto", "bfloat16", "bfloat16"),
    "--kernel-backend": ("kernel_backend", "auto", "torch", "torch"),
    "--show": ("show", 0, "2", 2),
}
GENERATE_CHOICES = {
    "--perturbation": ("visual-token", "pixel", "patch", "latent"),
    "--dropout-mode": ("remove", "mask"),
    "--sensitivity": ("logprob", "logit"),
    "--replacement": ("pdiff-ascending", "pdiff-ascending-cut", "deprived-contrast", "deprived-contrast-uncut"),
    "--mode": ("parallel", "sequential"),
    "--dtype": ("auto", "float32", "bfloat16", "float16"),
}
EVALUATE_FLAGS = {
    "--model": ("model", None, "m", "m"),
    "--adapter": ("adapter", None, "a", "a"),
    "--data": ("data", None, "test.json", "test.json"),
    "--image-folder": ("image_folder", None, "images", "images"),
    "--allow-images-outside-folder": ("allow_images_outside_folder", False, SWITCH, True),
    "--out": ("out", None, "o", "o"),
    "--batch-size": ("batch_size", 8, "3", 3),
    "--max-new-tokens": ("max_new_tokens", 64, "5", 5),
    "--device": ("device", None, "cpu", "cpu"),
    "--dtype": ("dtype", "auto", "float16", "float16"),
    "--limit": ("limit", None, "4", 4),
    "--visual": ("visual", "full", "none", "none"),
    "--drop-ratio": ("drop_ratio", 0.0, "0.5", 0.5),
    "--dropout-mode": ("dropout_mode", "remove", "mask", "mask"),
    "--seed": ("seed", 0, "9", 9),
    "--no-progress": ("no_progress", False, SWITCH, True),
    "--predictions": ("predictions", None, "answers.jsonl", "answers.jsonl"),
    "--compare": ("compare", None, ["run-a", "run-b"], ["run-a", "run-b"]),
}
EVALUATE_CHOICES = {"--dtype": ("auto", "float32", "bfloat16", "float16"), "--visual": ("full", "none"),
                    "--dropout-mode": ("remove", "mask")}
IMAGE_PREFERENCE_FLAGS = {
    "--data": ("data", "lesions.json", "other.json", "other.json"),  # required: the value every case gives
    "--image-folder": ("image_folder", None, "images", "images"),
    "--source": ("source", "auto", "slake", "slake"),
    "--mask-folder": ("mask_folder", None, "masks", "masks"),
    "--annotation-folder": ("annotation_folder", None, "xmlab", "xmlab"),
    "--out": ("out", "image_preferences.jsonl", "o.jsonl", "o.jsonl"),
    "--out-images": ("out_images", None, "corrupted", "corrupted"),
    "--num-samples": ("num_samples", 0, "5", 5),
    "--mode": ("mode", "replace", "add", "add"),
    "--sigma": ("sigma", None, "10", 10.0),
    "--fill-mean": ("fill_mean", None, "0", 0.0),
    "--seed": ("seed", 0, "4", 4),
    "--labels": ("labels", None, "Nodule,Mass", "Nodule,Mass"),
    "--margin": ("margin", 0, "2", 2),
}
IMAGE_PREFERENCE_CHOICES = {"--source": ("phantom", "slake", "auto"), "--mode": ("replace", "add")}
MINIMAL_EDIT_FLAGS = {
    "--preferences": ("preferences", "prefs.jsonl", "other.jsonl", "other.jsonl"),  # required
    "--out": ("out", "edits.jsonl", "o.jsonl", "o.jsonl"),  # required
    "--max-edited-words": ("max_edited_words", 3, "5", 5),
}


def _argv(flag, typed) -> list[str]:
    if typed is SWITCH:
        return [flag]
    return [flag, *typed] if isinstance(typed, list) else [flag, typed]


def _generate_values(argv):
    return GenerateConfig.from_args(argv).flags()


def _evaluate_values(argv):
    return dataclasses.asdict(EvaluateConfig.from_args(argv))


def _with_required(build_parser, required):
    """The parsed flags of a command that requires some (given first, each overridable by a later flag)."""
    def values(argv):
        (config,) = parse_flags(build_parser(), [*required, *argv])
        return dataclasses.asdict(config)
    return values


COMMANDS = {
    "generate": (GENERATE_FLAGS, GENERATE_CHOICES, _generate_values, generate.build_parser),
    "evaluate": (EVALUATE_FLAGS, EVALUATE_CHOICES, _evaluate_values, evaluate.build_parser),
    "image_preferences": (IMAGE_PREFERENCE_FLAGS, IMAGE_PREFERENCE_CHOICES,
                          _with_required(image_preferences.build_parser, ["--data", "lesions.json"]),
                          image_preferences.build_parser),
    "minimal_edits": (MINIMAL_EDIT_FLAGS, {}, _with_required(minimal_edits.build_parser,
                                                             ["--preferences", "prefs.jsonl", "--out", "edits.jsonl"]),
                      minimal_edits.build_parser),
}
CASES = [(command, flag) for command, (flags, *_) in COMMANDS.items() for flag in flags]


@pytest.mark.parametrize("command", list(COMMANDS))
def test_no_flags_give_the_old_defaults_and_the_same_flag_names(command):
    flags, choices, values, build_parser = COMMANDS[command]
    assert values([]) == {dest: default for dest, default, _, _ in flags.values()}
    parser = build_parser()
    dashed = {option for action in parser._actions for option in action.option_strings
              if option.startswith("--") and "_" not in option and option != "--help"}
    assert dashed == set(flags)  # no flag lost, none added
    for action in parser._actions:
        for option in set(action.option_strings) & set(choices):
            assert tuple(action.choices) == choices[option], option


@pytest.mark.parametrize(("command", "flag"), CASES)
def test_every_old_flag_parses_to_the_same_value_and_type(command, flag):
    flags, _, values, _ = COMMANDS[command]
    dest, _, typed, parsed = flags[flag]
    got = values(_argv(flag, typed))
    assert got[dest] == parsed and type(got[dest]) is type(parsed), (got[dest], parsed)
    expected = {name: default for name, default, _, _ in flags.values()} | {dest: parsed}
    if flag == "--literal-top-n":  # the switch is the command-line spelling of "no threshold"
        expected["min_sensitivity"] = None
    assert got == expected


def test_optional_numbers_parse_as_their_type_not_as_text():
    hints = typing.get_type_hints(SelfContrastConfig)
    assert hints["min_sensitivity"] == float | None
    stage1 = GenerateConfig.from_args(["--min-sensitivity", "1e-3", "--max-length", "64"])
    assert stage1.stage1.min_sensitivity == 0.001 and stage1.limits.max_length == 64
    assert type(EvaluateConfig.from_args(["--limit", "12"]).limit) is int


def test_stage1_settings_are_parsed_straight_into_the_library_config():
    config = GenerateConfig.from_args(["--top-n", "3", "--kernel-backend", "torch", "--literal-top-n"])
    assert type(config.stage1) is SelfContrastConfig
    assert config.stage1 == SelfContrastConfig(top_n=3, kernel_backend="torch", min_sensitivity=None)


@pytest.mark.parametrize(("main", "argv", "message"), [
    (generate.main, ["--top-n", "many"], r"^error: argument --top_n/--top-n: invalid int value: 'many'"),
    (generate.main, ["--replacement", "best"], r"^error: argument --replacement: invalid choice: 'best'"),
    (generate.main, ["--no-such-flag"], r"^error: unrecognized arguments: --no-such-flag"),
    (evaluate.main, ["--visual", "partly"], r"^error: argument --visual: invalid choice: 'partly'"),
    (evaluate.main, ["--drop-ratio", "half"], r"^error: argument --drop_ratio/--drop-ratio: invalid float"),
    (train.main, ["--epochs", "1.5"], r"^error: argument --epochs: invalid int value: '1.5'"),
    (train.main, ["--epochs", "1", "--no-such-flag"], r"^error: unrecognized arguments: --no-such-flag"),
    (image_preferences.main, ["--data", "d.json", "--sigma", "loud"], r"^error: argument --sigma: invalid float"),
    (image_preferences.main, [], r"^error: the following arguments are required: --data"),
    (minimal_edits.main, ["--preferences", "p.jsonl"], r"^error: the following arguments are required: --out"),
])
def test_a_value_argparse_cannot_take_is_one_line_and_exit_2(main, argv, message, capsys):
    import re

    with pytest.raises(SystemExit) as refused:
        main(argv)
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert refused.value.code == 2 and len(lines) == 1 and re.search(message, lines[0]), lines


@pytest.mark.parametrize(("main", "argv", "message"), [
    (generate.main, ["--top-n", "0", "--num-candidates", "-1"],
     "error: --top-n must be >= 1, got 0; --num-candidates must be >= 0, got -1"),
    (generate.main, ["--alpha", "1.5"], "error: --alpha must be in [0, 1], got 1.5"),
    (generate.main, ["--max-length", "0"], "error: --max-length must be >= 1, got 0"),
    (generate.main, ["--num-samples", "-2"], "error: --num-samples must be >= 0, got -2"),
    (evaluate.main, ["--limit", "0"], "error: --limit must be at least 1, got 0"),
    (train.main, ["--learning-rate=-1e-4"], "error: --learning-rate must be in (0, inf), got -0.0001"),
    (train.main, ["--chosen-nll-weight", "-1"], "error: --chosen-nll-weight must be in [0, inf), got -1.0"),
    (train.main, ["--token-kl-lambda", "2"], "error: --token-kl-lambda must be in [0, 1], got 2.0"),
    (train.main, ["--epochs", "0"], "error: --epochs must be in [1, inf), got 0"),
    (evaluate.main, ["--predictions", "a.jsonl", "--compare", "run"], "error: give --predictions or --compare, not "
                                                                       "both"),
])
def test_a_value_a_settings_dataclass_refuses_names_the_flag_in_one_line(main, argv, message, capsys):
    assert main(argv) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(message), lines


def test_the_library_config_refuses_under_the_field_name():
    from hscr_fast import HscrError

    with pytest.raises(HscrError, match=r"^drop_ratio must be in \[0, 1\), got 1.0$"):
        SelfContrastConfig(drop_ratio=1.0)


def test_training_settings_no_run_can_use_are_refused_by_the_library_config():
    from hscr_fast import HscrError
    from hscr_fast.training.config import TrainConfig

    with pytest.raises(HscrError, match=r"^gamma must be in \(0, inf\), got 0$"):
        TrainConfig(gamma=0)
    with pytest.raises(HscrError, match=r"^warmup_ratio must be in \[0, 1\), got 1$"):
        TrainConfig(warmup_ratio=1)
    TrainConfig(max_grad_norm=0, eval_steps=0, warmup_ratio=0, stop_after_steps=None)  # the documented "off" values


def test_spelled_out_choices_are_the_librarys():
    from hscr_fast.models.dropout import DROPOUT_MODES
    from hscr_fast.preferences import config

    assert config.DROPOUT_MODES == DROPOUT_MODES
