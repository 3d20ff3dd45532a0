"""`torchrun -m hscr_fast.train`: Stage 3, MLPO training of a LoRA adapter on preference lists.

    torchrun --nproc_per_node=N -m hscr_fast.train --model DIR --preferences prefs.jsonl --image-folder DIR --out DIR
    torchrun -m hscr_fast.train                     # no arguments: the demo, end to end (see hscr_fast.demo.pipeline)

The loop is `hscr_fast.training.loop.train`; this module parses the flags and maps errors to exit codes.
"""
from __future__ import annotations

import sys

from hscr_fast.runtime.errors import exit_code_of
from hscr_fast.training.config import TrainConfig


def main(argv: list[str] | None = None) -> int:
    def body() -> int | None:
        config = TrainConfig.from_args(argv)  # a value the config refuses is bad input too: exit 2, one line
        if config.model is None and config.preferences is None:
            from hscr_fast.demo.pipeline import run_demo

            return run_demo(config)
        from hscr_fast.training.loop import train

        train(config)
        return None

    return exit_code_of(body)


if __name__ == "__main__":
    sys.exit(main())

