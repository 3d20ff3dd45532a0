"""`python -m hscr_fast.generate`: HSCR Stages 1–2 — preference lists from an SFT model and its SFT data.

    python -m hscr_fast.generate --model DIR --data sft.json --image-folder DIR --out prefs.jsonl

The work is `hscr_fast.preferences.pipeline.run` (its docstring describes the output files and resuming); this module
parses the flags, falls back to the demo world when given no --model/--data, and maps errors to exit codes.
"""
from __future__ import annotations

import sys
from pathlib import Path

from hscr_fast.preferences.config import (  # noqa: F401  (the choices and the parser, for callers of the command)
    PERTURBATIONS,
    REPLACEMENT_RULES,
    GenerateConfig,
    build_parser,
)
from hscr_fast.preferences.pipeline import OutputPaths, run
from hscr_fast.runtime.errors import HscrError, exit_code_of


def resolve_inputs(inputs) -> tuple[Path, Path, Path]:
    """(model dir, data file, image folder) of `GenerateInputs`: the user's, or the demo world's when neither --model
    nor --data is given."""
    if inputs.model is None and inputs.data is None:
        from hscr_fast.demo import ensure_demo_world

        world = ensure_demo_world()
        return Path(world.model_dir), Path(world.train_json), Path(inputs.image_folder or world.image_folder)
    if inputs.model is None or inputs.data is None:
        raise HscrError("give both --model and --data (or neither, to run on the demo world)")
    model, data = Path(inputs.model), Path(inputs.data)
    if not model.is_dir():
        raise HscrError(f"--model {model}: no such directory (give a local transformers checkpoint; convert "
                         f"original LLaVA-Med weights with `python -m hscr_fast.models.convert SRC DST`)")
    from hscr_fast.models.vlm import preflight_model

    preflight_model(model)  # a checkpoint without (complete) weights fails now, not after the data
    return model, data, Path(inputs.image_folder) if inputs.image_folder else data.parent


def format_summary(summary: dict) -> str:
    from hscr_fast.preferences.list_summary import format_list_statistics

    skipped = ", ".join(f"{reason} {count}" for reason, count in summary["skipped"].items()) or "none"
    return (f"read {summary['read']}, selected {summary['selected']}, written {summary['written']}, "
            f"skipped {summary['skipped_total']} ({skipped}), mean k {summary['mean_k']:.2f}, "
            f"{summary['samples_per_s']:.2f} samples/s ({summary['processed_this_run']} this run)\n"
            f"{format_list_statistics(summary)}\n"
            f"  → {summary['output']}\n  → {summary['skipped_file']}")


def main(argv: list[str] | None = None) -> int:
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()  # weight-loading bars would interleave with ours
    # Parsed inside: a value a settings dataclass refuses is one line and exit 2, before the demo fallback.
    return exit_code_of(lambda: generate(GenerateConfig.from_args(argv)))


def generate(config: GenerateConfig) -> None:
    summary = run(config, *resolve_inputs(config.inputs))
    if summary is None:  # not rank 0
        return
    print(format_summary(summary))
    print(f"  → {OutputPaths(Path(config.inputs.out)).summary}")
    if summary["selected"] and not summary["written"]:  # nothing to train on: a failure, whatever the reasons
        raise HscrError(f"no preference list written: all {summary['selected']} selected records were skipped "
                        f"({', '.join(f'{reason} {count}' for reason, count in summary['skipped'].items())}); the "
                        f"reasons per record are in {summary['skipped_file']}")


if __name__ == "__main__":
    sys.exit(main())

