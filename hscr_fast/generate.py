"""`python -m hscr_fast.generate`: HSCR Stages 1–2 — preference lists from an SFT model and its SFT data.

    python -m hscr_fast.generate --model DIR --data sft.json --image-folder DIR --out prefs.jsonl

The work is `hscr_fast.preferences.pipeline.run` (its docstring describes the output files and resuming); this module
parses the flags, falls back to the demo world when given no --model/--data, and maps errors to exit codes.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from hscr_fast.preferences.pipeline import OutputPaths, run, validate_args
from hscr_fast.runtime.errors import HscrError, exit_code_of

# The names of hscr_fast.models.perturbation.PERTURBATIONS and hscr_fast.preferences.selfcontrast.REPLACEMENT_RULES (a
# test holds them equal), spelled out so that `--help` answers without importing torch.
PERTURBATIONS = ("visual-token", "pixel", "patch", "latent")
REPLACEMENT_RULES = ("pdiff-ascending", "pdiff-ascending-cut", "deprived-contrast", "deprived-contrast-uncut")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m hscr_fast.generate",
        description="HSCR Stages 1-2: build preference lists (y_w ≻ y_l1 ≻ … ≻ y_lk) from an SFT model and its data. "
                    "With no --model/--data, runs on the demo world.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    io = parser.add_argument_group("inputs and outputs")
    io.add_argument("--model", help="SFT model directory (LLaVA-family transformers checkpoint)")
    io.add_argument("--data", help="SFT data, LLaVA-Med JSON list")
    io.add_argument("--image-folder", help="folder the data's image paths are relative to "
                                           "(default: the data file's folder)")
    io.add_argument("--out", default="preferences.jsonl", help="output JSONL (skipped samples and the summary are "
                                                               "written beside it)")
    io.add_argument("--num-samples", type=int, default=2000, help="use the first N valid records (0 = all)")
    io.add_argument("--allow-images-outside-folder", action="store_true",
                    help="accept image paths that lead outside --image-folder (absolute, '..', symlinks out); such "
                         "records are skipped (image_outside_folder) by default")
    stage1 = parser.add_argument_group("stage 1: token-level self-contrastive rewarding")
    stage1.add_argument("--seed", type=int, default=0, help="global seed of the per-sample visual token dropout")
    stage1.add_argument("--perturbation", choices=PERTURBATIONS, default="visual-token",
                        help="how the image is taken away (paper Table 5): visual-token dropout after the projector, "
                             "or pixel-, patch- or latent-level masking in the CLIP encoder (LLaVA only)")
    stage1.add_argument("--drop-ratio", type=float, default=0.7,
                        help="fraction of the perturbation's units hidden (visual tokens, pixels, patches or "
                             "attention-mask entries)")
    stage1.add_argument("--dropout-mode", choices=("remove", "mask"), default="remove",
                        help="visual-token perturbation: dropped tokens leave the sequence or are masked out")
    stage1.add_argument("--sensitivity", choices=("logprob", "logit"), default="logprob",
                        help="s_t from log-probability (default) or raw logit differences")
    stage1.add_argument("--beta", type=float, default=0.9, help="contrast strength of Eq. 3")
    stage1.add_argument("--top-n", type=int, default=10, help="sensitive positions per answer (fewer if shorter)")
    stage1.add_argument("--min-sensitivity", type=float, default=0.0,
                        help="only tokens with s_t above this are sensitive (0: tokens the image supports)")
    stage1.add_argument("--literal-top-n", action="store_true",
                        help="take the top-n tokens by s_t whatever its sign (the paper's wording, read literally)")
    stage1.add_argument("--alpha", type=float, default=0.1, help="plausibility cut p_full >= alpha * max p_full")
    stage1.add_argument("--replacement", choices=REPLACEMENT_RULES, default="deprived-contrast-uncut",
                        help="replacement rule: pdiff-ascending = lowest P_diff among the image-deprived top "
                             "--num-candidates and the tokens plausible with the image; pdiff-ascending-cut = the same "
                             "with deprived-side tokens also plausible without the image; deprived-contrast = highest "
                             "(1+beta)L' - beta L among the deprived top --num-candidates that are plausible without "
                             "the image; deprived-contrast-uncut = the same over the whole deprived top "
                             "--num-candidates")
    stage1.add_argument("--num-candidates", type=int, default=8,
                        help="top tokens of the image-deprived distribution added to the candidates")
    stage1.add_argument("--num-variants", type=int, default=5, help="graded variants per answer (M)")
    stage1.add_argument("--num-alternatives", type=int, default=2,
                        help="next-best replacements per sensitive position, used as single swaps when an answer has "
                             "fewer sensitive positions than --num-variants")
    stage1.add_argument("--mode", choices=("parallel", "sequential"), default="parallel",
                        help="parallel: one scoring pass; sequential: re-score after each replacement (Eq. 4)")
    stage1.add_argument("--include-punctuation", action="store_true",
                        help="let whitespace/punctuation-only tokens be sensitive (special tokens never are)")
    stage1.add_argument("--max-length", type=int, default=None,
                        help="skip samples whose prompt + visual tokens + answer exceed this (default: the model's "
                             "max positions)")
    stage2 = parser.add_argument_group("stage 2: similarity-aware re-ranking")
    stage2.add_argument("--num-dispreferred", type=int, default=3, help="j: most dispreferred responses kept")
    stage2.add_argument("--min-gap", type=float, default=0.1, help="least similarity drop between kept responses")
    stage2.add_argument("--similarity-model", default=None,
                        help="sentence-transformers model directory (default: bundled all-MiniLM-L6-v2)")
    run = parser.add_argument_group("execution")
    run.add_argument("--batch-size", type=int, default=8, help="samples per batched forward")
    run.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N (under torchrun: cuda:LOCAL_RANK)")
    run.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"),
                     help="auto: bfloat16 on GPU, float32 on CPU")
    run.add_argument("--kernel-backend", default="auto", help="backend of hscr_fast.kernels.contrastive_select")
    run.add_argument("--show", type=int, default=0, metavar="N", help="print N preference lists for a person")
    return parser


# -- the command ------------------------------------------------------------------------------------------------------
def resolve_inputs(args) -> tuple[Path, Path, Path]:
    """(model dir, data file, image folder): the user's, or the demo world's when neither --model nor --data is
    given."""
    if args.model is None and args.data is None:
        from hscr_fast.demo import ensure_demo_world

        world = ensure_demo_world()
        return Path(world.model_dir), Path(world.train_json), Path(args.image_folder or world.image_folder)
    if args.model is None or args.data is None:
        raise HscrError("give both --model and --data (or neither, to run on the demo world)")
    model, data = Path(args.model), Path(args.data)
    if not model.is_dir():
        raise HscrError(f"--model {model}: no such directory (give a local transformers checkpoint; convert "
                         f"original LLaVA-Med weights with `python -m hscr_fast.models.convert SRC DST`)")
    from hscr_fast.models.vlm import preflight_model

    preflight_model(model)  # a checkpoint without (complete) weights fails now, not after the data
    return model, data, Path(args.image_folder) if args.image_folder else data.parent


def format_summary(summary: dict) -> str:
    from hscr_fast.preferences.list_summary import format_list_statistics

    skipped = ", ".join(f"{reason} {count}" for reason, count in summary["skipped"].items()) or "none"
    return (f"read {summary['read']}, selected {summary['selected']}, written {summary['written']}, "
            f"skipped {summary['skipped_total']} ({skipped}), mean k {summary['mean_k']:.2f}, "
            f"{summary['samples_per_s']:.2f} samples/s ({summary['processed_this_run']} this run)\n"
            f"{format_list_statistics(summary)}\n"
            f"  → {summary['output']}\n  → {summary['skipped_file']}")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()  # weight-loading bars would interleave with ours
    return exit_code_of(lambda: generate(args))


def generate(args) -> None:
    validate_args(args)  # before the demo fallback: a bad flag fails at once
    summary = run(args, *resolve_inputs(args))
    if summary is None:  # not rank 0
        return
    print(format_summary(summary))
    print(f"  → {OutputPaths(Path(args.out)).summary}")
    if summary["selected"] and not summary["written"]:  # nothing to train on: a failure, whatever the reasons
        raise HscrError(f"no preference list written: all {summary['selected']} selected records were skipped "
                        f"({', '.join(f'{reason} {count}' for reason, count in summary['skipped'].items())}); the "
                        f"reasons per record are in {summary['skipped_file']}")


if __name__ == "__main__":
    sys.exit(main())

