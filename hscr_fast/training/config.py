"""The settings of a Stage 3 run: every flag of `torchrun -m hscr_fast.train`, with the paper's defaults (Table 7)."""
from __future__ import annotations

from dataclasses import dataclass

from hscr_fast.runtime.errors import HscrError
from hscr_fast.runtime.flags import flag_parser, parse_flags
from hscr_fast.runtime.flags import setting as _arg

DESCRIPTION = "Stage 3 — multi-level preference optimisation (MLPO) on the prefix-shared listwise forward."


_INF = float("inf")
# (field, low, high, (low included, high included)) for every number a run reads.
_RANGES = (("learning_rate", 0, _INF, (False, False)), ("gamma", 0, _INF, (False, False)),
           ("epochs", 1, _INF, (True, False)), ("per_device_batch_size", 1, _INF, (True, False)),
           ("gradient_accumulation_steps", 1, _INF, (True, False)), ("warmup_ratio", 0, 1, (True, False)),
           ("weight_decay", 0, _INF, (True, False)), ("max_grad_norm", 0, _INF, (True, False)),
           ("token_kl_weight", 0, _INF, (True, False)), ("token_kl_lambda", 0, 1, (True, True)),
           ("chosen_nll_weight", 0, _INF, (True, False)), ("lora_r", 1, _INF, (True, False)),
           ("lora_dropout", 0, 1, (True, False)), ("eval_fraction", 0, 1, (True, False)),
           ("eval_steps", 0, _INF, (True, False)), ("max_answer_tokens", 1, _INF, (True, False)),
           ("save_steps", 1, _INF, (True, False)), ("save_total_limit", 1, _INF, (True, False)),
           ("stop_after_steps", 1, _INF, (True, False)), ("log_every", 1, _INF, (True, False)))


@dataclass
class TrainConfig:
    model: str | None = _arg(None, "SFT model directory: a vision-language checkpoint (LLaVA, LLaVA-NeXT, Qwen2-VL) or "
                                   "a text-only causal LM (Llama, Mistral, Qwen2, ...); omit for the demo")
    preferences: str | None = _arg(None, "preference lists JSONL from hscr_fast.generate (or TRL-style pairs: "
                                         "prompt/chosen/rejected); lists without images for a text-only model")
    image_folder: str | None = _arg(None, "folder the preference records' image paths are relative to (vision-"
                                          "language models)")
    eval_preferences: str | None = _arg(None, "held-out preference lists JSONL, scored with the training objective "
                                              "every --eval-steps (eval_* metrics)")
    eval_image_folder: str | None = _arg(None, "image folder of --eval-preferences (default: --image-folder)")
    allow_images_outside_folder: bool = _arg(False, "accept image paths that lead outside the image folder "
                                                    "(absolute, '..', symlinks out); refused by default")
    eval_fraction: float = _arg(0.0, "instead of --eval-preferences, hold out this fraction of --preferences (chosen "
                                     "by a hash of each id: the same lists on every run and rank)")
    eval_steps: int = _arg(50, "optimizer steps between held-out evaluations (and one at the end); 0 = at the end only")
    save_best: bool = _arg(False, "also keep the adapter of the evaluation with the lowest held-out loss in "
                                  "OUT/adapter-best (needs --eval-preferences or --eval-fraction)")
    out: str = _arg("runs/hscr-mlpo", "output directory: adapter/, checkpoints/, metrics.jsonl, curves.png")
    epochs: int = _arg(2, "epochs over the preference lists (paper: 2)")
    learning_rate: float = _arg(5e-7, "peak learning rate (paper: 5e-7)")
    warmup_ratio: float = _arg(0.03, "fraction of optimizer steps spent warming up linearly")
    weight_decay: float = _arg(0.0, "AdamW weight decay (paper: none)")
    per_device_batch_size: int = _arg(2, "prompts per device per micro-batch (paper: 2)")
    gradient_accumulation_steps: int = _arg(1, "micro-batches per optimizer step")
    max_grad_norm: float = _arg(1.0, "gradient clipping norm (0 disables)")
    gamma: float = _arg(0.1, "reward scale γ in r(y) = γ·(log π − log π_ref)")
    loss: str = _arg("mlpo", "mlpo (HSCR, Eq. 7); dpo (y_w vs y_l1 only, weights ignored); weighted-dpo (MMedPO: "
                             "each sample's DPO loss times its 'weight' field, used as given); plackett-luce "
                             "(listwise DPO, Rafailov et al. 2023 App. A.3); lipo-lambda (LiPO-λ, Liu et al. 2024)",
                     choices=("mlpo", "dpo", "weighted-dpo", "plackett-luce", "lipo-lambda"))
    kind_weight: list[str] | None = _arg(None, "KIND=W multiplies the loss of records whose 'kind' is KIND by W, e.g. "
                                        "image-dispreference=0.1 for a visual grounding term (repeatable)",
                                  action="append")
    token_kl_weight: float = _arg(0.0, "α of a token-wise bidirectional KL to the reference on the preferred response "
                                       "(token-level alignment uses 0.01; 0 = off)")
    token_kl_lambda: float = _arg(0.5, "λ in λ·KL(ref‖π) + (1−λ)·KL(π‖ref)")
    token_kl_scope: str = _arg("preferred", "tokens the KL covers: the whole preferred response, or only its "
                                            "<mask>…</mask> spans", choices=("preferred", "marked"))
    chosen_nll_weight: float = _arg(0.0, "α of a length-normalised NLL of the preferred response added to the "
                                         "preference loss (RPO, Pang et al. 2024; not in the HSCR paper; 0 = off)")
    explicit: bool = _arg(True, "include the explicit loss L_E (y_w vs each y_l)")
    implicit: bool = _arg(True, "include the implicit loss L_I (y_lj vs each worse y_lm)")
    lora_r: int = _arg(16, "LoRA rank (paper: 16)")
    lora_alpha: int = _arg(32, "LoRA alpha")
    lora_dropout: float = _arg(0.0, "LoRA dropout (0 keeps the policy deterministic: at step 0 it equals the "
                                    "reference)")
    train_projector: bool = _arg(False, "also train the multimodal projector (fully)")
    deepspeed: str = _arg("zero2", "'zero2' or 'zero3' (built from these flags), 'none' (plain PyTorch), or a "
                                   "DeepSpeed JSON file")
    gradient_checkpointing: bool = _arg(False, "recompute decoder activations in backward (less memory)")
    dtype: str = _arg("auto", "auto (bf16 on GPU, fp32 on CPU), float32 or bfloat16")
    attn_implementation: str = _arg("auto", "attention kernel for the decoder: auto (flex_attention on CUDA where "
                                            "transformers offers it for the decoder, which skips the masked blocks of "
                                            "the listwise mask; sdpa elsewhere), sdpa (a dense 4D mask), "
                                            "flex_attention or eager. flash-attention's kernels cannot take the "
                                            "listwise mask",
                                    choices=("auto", "sdpa", "flex_attention", "eager"))
    max_answer_tokens: int = _arg(512, "longest response accepted, in tokens")
    save_steps: int = _arg(50, "checkpoint every N optimizer steps (and at the end)")
    save_total_limit: int = _arg(2, "checkpoints kept")
    resume: bool = _arg(False, "continue from the latest checkpoint in OUT/checkpoints")
    overwrite: bool = _arg(False, "replace the run already in OUT (its adapter, checkpoints and metrics are deleted); "
                                  "without it (or --resume) an OUT holding a run is refused")
    stop_after_steps: int | None = _arg(None, "stop (after checkpointing) once this many optimizer steps are done; "
                                              "the schedule still spans the full run — for time-limited jobs")
    merge: bool = _arg(False, "also write the merged model (base + adapter) to OUT/merged")
    seed: int = _arg(0, "seed for data order and initialisation")
    log_every: int = _arg(1, "optimizer steps between metric lines")

    def __post_init__(self):
        # --kind-weight may be repeated, each time with one or more KIND=W: argparse hands over a list per use.
        if self.kind_weight:
            self.kind_weight = [entry for group in self.kind_weight
                                for entry in ([group] if isinstance(group, str) else group)]
        # Values no run can use are refused here, before any file or model is opened (the command names the flag).
        for name, low, high, closed in _RANGES:
            value = getattr(self, name)
            if value is None:
                continue
            above = value >= low if closed[0] else value > low
            below = value <= high if closed[1] else value < high
            if not (above and below):
                interval = f"{'[' if closed[0] else '('}{low:g}, {high:g}{']' if closed[1] else ')'}"
                raise HscrError(f"{name} must be in {interval}, got {value}")

    @classmethod
    def from_args(cls, argv: list[str] | None = None) -> TrainConfig:
        """The flags parsed by transformers' `HfArgumentParser` (hscr_fast.runtime.flags): one --flag (and
        --flag_name) per field, typed from the annotation, help from the metadata; a bool field defaulting to True
        also gets --no-flag."""
        parser = flag_parser(cls, prog="torchrun -m hscr_fast.train", description=DESCRIPTION)
        (config,) = parse_flags(parser, argv)
        return config
