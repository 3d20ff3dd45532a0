"""The settings of `python -m hscr_fast.evaluate`: every flag, as one dataclass that `HfArgumentParser` parses.

Three uses share them: evaluating a model (+ adapter) on a test set, scoring an answer file (`predictions`), and
charting finished runs side by side (`compare`).
"""
from __future__ import annotations

from dataclasses import dataclass

from hscr_fast.models.dropout import DROPOUT_MODES
from hscr_fast.runtime.errors import HscrError
from hscr_fast.runtime.flags import flag_parser, parse_flags, setting
from hscr_fast.runtime.precision import DTYPE_NAMES

VISUAL_MODES = ("full", "none")
PROG = "python -m hscr_fast.evaluate"
DESCRIPTION = "`python -m hscr_fast.evaluate`: Med-VQA evaluation of a model (+ adapter), or scoring of an answer file."


@dataclass
class EvaluateConfig:
    model: str | None = setting(None, "transformers LLaVA checkpoint directory (default: the demo model)")
    adapter: str | None = setting(None, "PEFT LoRA adapter directory to apply to --model")
    data: str | None = setting(None, "LLaVA-Med JSON test set (default: the phantom test set)")
    image_folder: str | None = setting(None, "folder the data's image paths are relative to")
    allow_images_outside_folder: bool = setting(False, "accept image paths that lead outside --image-folder "
                                                       "(absolute, '..', symlinks out); refused by default")
    out: str | None = setting(None, "output folder (predictions.jsonl, metrics.json, metrics.md)")
    batch_size: int = setting(8, "questions per generation batch")
    max_new_tokens: int = setting(64, "answer length limit in tokens")
    device: str | None = setting(None, "cpu, cuda, cuda:1 ... (default: cuda when available)")
    dtype: str = setting("auto", "auto = bfloat16 on cuda, float32 on cpu", choices=("auto", *DTYPE_NAMES))
    limit: int | None = setting(None, "evaluate only the first N questions of the data")
    visual: str = setting("full", "none = the prompt with the image removed (accuracy without visual tokens)",
                          choices=VISUAL_MODES)
    drop_ratio: float = setting(0.0, "drop this fraction of each image's visual tokens")
    dropout_mode: str = setting("remove", "dropped visual tokens leave the sequence or are masked out",
                                choices=DROPOUT_MODES)
    seed: int = setting(0, "seed of the visual token dropout")
    no_progress: bool = setting(False, "no progress bar")
    predictions: str | None = setting(None, "score this LLaVA-Med answer file ({question_id, text} JSONL) against "
                                            "--data; loads no model")
    compare: list[str] | None = setting(None, "bar chart of the metrics of these runs", metavar="RUN_DIR")

    def __post_init__(self):
        if self.limit is not None and self.limit < 1:
            raise HscrError(f"limit must be at least 1, got {self.limit}")
        if self.predictions and self.compare:
            raise HscrError("give predictions or compare, not both: one scores an answer file, the other charts runs")

    @classmethod
    def from_args(cls, argv: list[str] | None = None) -> EvaluateConfig:
        (config,) = parse_flags(build_parser(), argv)
        return config


def build_parser():
    """The command's `HfArgumentParser` (an argparse parser: `--help`, choices and types as usual)."""
    return flag_parser(EvaluateConfig, prog=PROG, description=DESCRIPTION)
