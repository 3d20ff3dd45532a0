"""`torchrun -m hscr_fast.train`: Stage 3, MLPO training of a LoRA adapter on preference lists.

    torchrun --nproc_per_node=N -m hscr_fast.train --model DIR --preferences prefs.jsonl --image-folder DIR --out DIR
    torchrun -m hscr_fast.train --model TEXT_LM_DIR --preferences lists.jsonl --out DIR   # a text-only causal LM
    torchrun -m hscr_fast.train                     # no arguments: the demo, end to end (see hscr_fast.demo.pipeline)

The loop is `hscr_fast.training.loop.train`; this module parses the flags and maps errors to exit codes.
"""
from __future__ import annotations

import sys

from hscr_fast.training.config import TrainConfig


def main(argv: list[str] | None = None) -> int:
    config = TrainConfig.from_args(argv)
    if config.model is None and config.preferences is None:
        from hscr_fast.demo.pipeline import run_demo

        return run_demo(config)
    from hscr_fast.data.records import DataFormatError
    from hscr_fast.models.causal_lm import UnsupportedTextModelError
    from hscr_fast.models.vlm import UnsupportedModelError
    from hscr_fast.training.loop import PreviousRunError, TrainingDiverged, train

    try:
        train(config)
    except TrainingDiverged as error:
        print(f"error: {error}", file=sys.stderr)
        return 3
    except (DataFormatError, PreviousRunError, UnsupportedModelError, UnsupportedTextModelError,
            FileNotFoundError) as error:
        # Bad input: one line naming the file/record and what is wrong; nothing was trained yet.
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

