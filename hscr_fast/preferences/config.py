"""The settings of Stages 1–2: every flag of `python -m hscr_fast.generate`, one dataclass per section of its help.

`SelfContrastConfig` is Stage 1's own configuration (what `hscr_fast.preferences.selfcontrast.SelfContrast` takes);
the command parses its flags straight into it. The other sections say what to read and write, how Stage 2 re-ranks
and how the work runs. Nothing here imports torch: settings can be built, parsed and checked without the model code.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar

from hscr_fast.runtime.errors import HscrError
from hscr_fast.runtime.flags import flag_parser, parse_flags, setting
from hscr_fast.runtime.precision import DTYPE_NAMES

# The names of hscr_fast.models.perturbation.PERTURBATIONS, of the keys of
# hscr_fast.preferences.selfcontrast.REPLACEMENT_RULES and of hscr_fast.models.dropout.DROPOUT_MODES (a test holds them
# equal), spelled out here because those modules import torch.
PERTURBATIONS = ("visual-token", "pixel", "patch", "latent")
REPLACEMENT_RULES = ("pdiff-ascending", "pdiff-ascending-cut", "deprived-contrast", "deprived-contrast-uncut")
DROPOUT_MODES = ("remove", "mask")
CONTRAST_MODES = ("parallel", "sequential")
SENSITIVITY_KINDS = ("logprob", "logit")

PROG = "python -m hscr_fast.generate"
DESCRIPTION = ("HSCR Stages 1-2: build preference lists (y_w ≻ y_l1 ≻ … ≻ y_lk) from an SFT model and its data. With "
               "no --model/--data, runs on the demo world.")


def _refuse(problems: list[str]) -> None:
    if problems:
        raise HscrError("; ".join(problems))


@dataclass
class GenerateInputs:
    _argument_group_name: ClassVar[str] = "inputs and outputs"

    model: str | None = setting(None, "SFT model directory (LLaVA-family transformers checkpoint)")
    data: str | None = setting(None, "SFT data, LLaVA-Med JSON list")
    image_folder: str | None = setting(None, "folder the data's image paths are relative to (default: the data "
                                             "file's folder)")
    out: str = setting("preferences.jsonl", "output JSONL (skipped samples and the summary are written beside it)")
    num_samples: int = setting(2000, "use the first N valid records (0 = all)")
    allow_images_outside_folder: bool = setting(False, "accept image paths that lead outside --image-folder "
                                                       "(absolute, '..', symlinks out); such records are skipped "
                                                       "(image_outside_folder) by default")

    def __post_init__(self):
        _refuse([f"num_samples must be >= 0, got {self.num_samples}"] if self.num_samples < 0 else [])


@dataclass(frozen=True)
class SelfContrastConfig:
    """Stage 1 settings; defaults are the paper's where it gives them, else chosen by measurement (docs/method.md)."""

    _argument_group_name: ClassVar[str] = "stage 1: token-level self-contrastive rewarding"

    seed: int = setting(0, "global seed of the per-sample visual token dropout")
    perturbation: str = setting("visual-token", "how the image is taken away (paper Table 5): visual-token dropout "
                                                "after the projector, or pixel-, patch- or latent-level masking in the "
                                                "CLIP encoder (LLaVA only)", choices=PERTURBATIONS)
    drop_ratio: float = setting(0.7, "fraction of the perturbation's units hidden (visual tokens, pixels, patches or "
                                     "attention-mask entries)")
    dropout_mode: str = setting("remove", "visual-token perturbation: dropped tokens leave the sequence or are masked "
                                          "out", choices=DROPOUT_MODES)
    sensitivity: str = setting("logprob", "s_t from log-probability (default) or raw logit differences",
                               choices=SENSITIVITY_KINDS)
    # None (the command's --literal-top-n): the literal top-n, whatever the sign of s_t.
    min_sensitivity: float | None = setting(0.0, "only tokens with s_t above this are sensitive (0: tokens the image "
                                                 "supports)")
    beta: float = setting(0.9, "contrast strength of Eq. 3")
    top_n: int = setting(10, "sensitive positions per answer (fewer if shorter)")
    alpha: float = setting(0.1, "plausibility cut p_full >= alpha * max p_full")
    replacement: str = setting(
        "deprived-contrast-uncut",
        "replacement rule: pdiff-ascending = lowest P_diff among the image-deprived top --num-candidates and the "
        "tokens plausible with the image; pdiff-ascending-cut = the same with deprived-side tokens also plausible "
        "without the image; deprived-contrast = highest (1+beta)L' - beta L among the deprived top --num-candidates "
        "that are plausible without the image; deprived-contrast-uncut = the same over the whole deprived top "
        "--num-candidates (measured: docs/method.md)", choices=REPLACEMENT_RULES)
    num_candidates: int = setting(8, "top tokens of the image-deprived distribution added to the candidates")
    num_variants: int = setting(5, "graded variants per answer (M)")
    num_alternatives: int = setting(2, "next-best replacements per sensitive position, used as single swaps when an "
                                       "answer has fewer sensitive positions than --num-variants")
    mode: str = setting("parallel", "parallel: one scoring pass; sequential: re-score after each replacement (Eq. 4)",
                        choices=CONTRAST_MODES)
    include_punctuation: bool = setting(False, "let whitespace/punctuation-only tokens be sensitive (special tokens "
                                               "never are)")
    kernel_backend: str = setting("auto", "backend of hscr_fast.kernels.contrastive_select")

    def __post_init__(self):
        choices = {"perturbation": PERTURBATIONS, "replacement": REPLACEMENT_RULES, "dropout_mode": DROPOUT_MODES,
                   "mode": CONTRAST_MODES, "sensitivity": SENSITIVITY_KINDS}
        problems = [f"{name} must be one of {allowed}, got {getattr(self, name)!r}"
                    for name, allowed in choices.items() if getattr(self, name) not in allowed]
        if not 0.0 <= self.drop_ratio < 1.0:
            problems.append(f"drop_ratio must be in [0, 1), got {self.drop_ratio}")
        problems += [f"{name} must be >= 1, got {getattr(self, name)}" for name in ("top_n", "num_variants")
                     if getattr(self, name) < 1]
        problems += [f"{name} must be >= 0, got {getattr(self, name)}"
                     for name in ("num_candidates", "num_alternatives") if getattr(self, name) < 0]
        if not 0.0 <= self.alpha <= 1.0:
            problems.append(f"alpha must be in [0, 1], got {self.alpha}")
        _refuse(problems)


@dataclass
class Stage1Limits:
    _argument_group_name: ClassVar[str] = "stage 1: which positions and samples"

    literal_top_n: bool = setting(False, "take the top-n tokens by s_t whatever its sign (the paper's wording, read "
                                         "literally)")
    max_length: int | None = setting(None, "skip samples whose prompt + visual tokens + answer exceed this (default: "
                                           "the model's max positions)")

    def __post_init__(self):
        if self.max_length is not None and self.max_length < 1:
            _refuse([f"max_length must be >= 1, got {self.max_length}"])


@dataclass
class RerankSettings:
    _argument_group_name: ClassVar[str] = "stage 2: similarity-aware re-ranking"

    num_dispreferred: int = setting(3, "j: most dispreferred responses kept")
    min_gap: float = setting(0.1, "least similarity drop between kept responses")
    similarity_model: str | None = setting(None, "sentence-transformers model directory (default: bundled "
                                                 "all-MiniLM-L6-v2)")


@dataclass
class Execution:
    _argument_group_name: ClassVar[str] = "execution"

    batch_size: int = setting(8, "samples per batched forward")
    device: str = setting("auto", "auto, cpu, cuda, cuda:N (under torchrun: cuda:LOCAL_RANK)")
    dtype: str = setting("auto", "auto: bfloat16 on GPU, float32 on CPU", choices=("auto", *DTYPE_NAMES))
    show: int = setting(0, "print N preference lists for a person", metavar="N")

    def __post_init__(self):
        _refuse([f"{name} must be >= {least}, got {getattr(self, name)}"
                 for name, least in (("batch_size", 1), ("show", 0)) if getattr(self, name) < least])


@dataclass
class GenerateConfig:
    """Every setting of a Stages 1–2 run, by section."""

    inputs: GenerateInputs = dataclasses.field(default_factory=GenerateInputs)
    stage1: SelfContrastConfig = dataclasses.field(default_factory=SelfContrastConfig)
    limits: Stage1Limits = dataclasses.field(default_factory=Stage1Limits)
    rerank: RerankSettings = dataclasses.field(default_factory=RerankSettings)
    execution: Execution = dataclasses.field(default_factory=Execution)

    SECTIONS: ClassVar[tuple[type, ...]] = (GenerateInputs, SelfContrastConfig, Stage1Limits, RerankSettings,
                                            Execution)

    def __post_init__(self):
        # One name for the literal rule: in the fingerprint, the summary and Stage 1 itself.
        if self.limits.literal_top_n and self.stage1.min_sensitivity is not None:
            self.stage1 = dataclasses.replace(self.stage1, min_sensitivity=None)

    @classmethod
    def from_args(cls, argv: list[str] | None = None) -> GenerateConfig:
        return cls(*parse_flags(build_parser(), argv))

    def sections(self) -> tuple:
        return self.inputs, self.stage1, self.limits, self.rerank, self.execution

    def flags(self) -> dict[str, Any]:
        """Every flag's value by its field name (the summary's record of the run)."""
        return {item.name: getattr(section, item.name) for section in self.sections()
                for item in dataclasses.fields(section)}


def build_parser():
    """The command's `HfArgumentParser` (an argparse parser: `--help`, choices and types as usual)."""
    return flag_parser(GenerateConfig.SECTIONS, prog=PROG, description=DESCRIPTION)
