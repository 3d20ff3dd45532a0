"""The MLPO step against the real pairwise peer: TRL's `DPOTrainer` on the expanded pairs of the same lists.

Every prompt has a k = 3 list (y_w ≻ y_l1 ≻ y_l2 ≻ y_l3): MLPO's explicit + implicit terms are the DPO losses of its
6 pairs, so TRL trains on those 6 pairs as chosen/rejected examples. Same model object (LoRA r=16 on the language
model's linear layers), same images and answers, same precision, same number of prompts per step. A step is the
loss's forward and backward (no optimizer), timed for every form in each round, the forms alternating within a round
so that a slow spell of a shared machine falls on all of them.

Forms:
- `ours`: the listwise prefix-shared forward (vision once, prefix once, Σ answers), log-probs of answer tokens only,
  and the reference log-probs computed in the step from the same packed batch with the adapter disabled (no grad),
  which is how TRL gets its reference for a vision dataset;
- `ours_cached_reference`: the same with the reference log-probs given, as our trainer runs (it caches them once);
- `trl_shipped`: `DPOTrainer.compute_loss` + backward as TRL ships it on this device. On CPU TRL scores every position
  of every sequence (prompt and image tokens included) against the vocabulary; on CUDA and XPU only the answer
  positions (its `_use_triton` check in `trl.trainer.utils`);
- `trl_answer_only` (CPU only): TRL with that check forced true, i.e. its GPU behaviour (its own torch tiles, not
  Triton, still do the work on CPU);
- on CUDA, `ours_flex`: `ours` with the listwise mask as a FlexAttention BlockMask (hscr_fast.listwise_attention).

Reported per form: best and median step time over the rounds, peak memory, tokens through the decoder per step
(reference pass included), positions projected onto the vocabulary; ratios TRL / ours name the peer and its mode.
On CUDA also peak memory with gradient checkpointing and model FLOPs utilisation on real (unpadded) tokens.

Environment: HSCR_BENCH_ROUNDS (default 3), HSCR_BENCH_THREADS (CPU threads, default 1, as in conftest),
HSCR_BENCH_SHAPE (CPU: "2x384" default, or "4x1024"; CUDA: "7b"),
HSCR_BENCH_NOTE (free text stored with the result, e.g. how loaded the machine was).
"""
from __future__ import annotations

import contextlib
import itertools
import os
import statistics

import pytest
import torch

from hscr_fast.listwise import ListwiseExample, listwise_logprobs, pack_examples
from hscr_fast.listwise_attention import FLEX_ATTENTION, flex_attention_preferred
from hscr_fast.losses import mlpo_loss

ANSWERS = ["yes", "no", "left upper lobe", "right lower lobe nodule", "two", "a small lesion", "none", "large"]
RESPONSES_PER_PROMPT = 4  # k = 3
PROMPTS_PER_STEP = 2
BETA = 0.1
LORA_RANK = 16
LORA_TARGETS = (r".*language_model\.layers\.\d+\."
                r"(self_attn\.(q_proj|k_proj|v_proj|o_proj)|mlp\.(gate_proj|up_proj|down_proj))")
# Decoder shapes for CPU runs: small but wide (144 image tokens, a 32000-token vocabulary: the VQA regime).
CPU_SHAPES = {
    "2x384": dict(text_hidden=384, text_layers=2, text_heads=6, text_kv_heads=2, text_intermediate=768),
    "4x1024": dict(text_hidden=1024, text_layers=4, text_heads=16, text_kv_heads=4, text_intermediate=2816),
}
# Nominal dense bf16 tensor-core rates (no sparsity), for MFU against the data sheet.
NOMINAL_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12}


def build_model(device: torch.device, shape: str):
    """(VisionLanguageModel with LoRA, dtype). CPU: a tiny LLaVA widened to `shape`; CUDA: LLaVA-Med-7B-shaped (CLIP
    ViT-L/14@336 + Mistral-7B, 576 image tokens) with random weights, bf16."""
    from peft import LoraConfig, get_peft_model
    from transformers import (
        CLIPVisionConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        MistralConfig,
    )

    from hscr_fast.models.tiny import TinyLlavaSpec, build_tiny_llava
    from hscr_fast.models.vlm import VisionLanguageModel

    if device.type == "cpu":
        spec = TinyLlavaSpec(image_size=168, patch_size=14, vision_hidden=64, vision_layers=2, **CPU_SHAPES[shape])
        model, processor = build_tiny_llava(spec)
        model.resize_token_embeddings(32000, mean_resizing=False)
        model.config.text_config.vocab_size = 32000
        dtype = torch.float32
    else:
        _, processor = build_tiny_llava()
        vision = CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                                  num_attention_heads=16, image_size=336, patch_size=14, projection_dim=768)
        text = MistralConfig(vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                             num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=32768,
                             sliding_window=None, pad_token_id=processor.tokenizer.pad_token_id)
        config = LlavaConfig(vision_config=vision, text_config=text,
                             image_token_index=processor.tokenizer.convert_tokens_to_ids("<image>"),
                             image_seq_length=576, vision_feature_select_strategy="default", vision_feature_layer=-2)
        config._attn_implementation = "sdpa"
        torch.manual_seed(0)
        dtype = torch.bfloat16
        with torch.device(device):
            model = LlavaForConditionalGeneration(config).to(dtype)
        processor.image_processor.size = {"shortest_edge": 336}
        processor.image_processor.crop_size = {"height": 336, "width": 336}
        processor.patch_size = 14
    model = model.to(device)
    model.requires_grad_(False)
    lora = LoraConfig(r=LORA_RANK, lora_alpha=2 * LORA_RANK, lora_dropout=0.0, target_modules=LORA_TARGETS,
                      bias="none")
    model = get_peft_model(model, lora)
    return VisionLanguageModel(model, processor), dtype


def make_lists(num_prompts: int, image_size: int, seed: int = 0):
    """Square random RGB images (no padding differences), questions and k = 3 answer lists (best first)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    images = [Image.fromarray(rng.integers(0, 256, (image_size, image_size, 3), dtype=np.uint8))
              for _ in range(num_prompts)]
    questions = [f"Is there a lesion in the left lung of patient {i}?" for i in range(num_prompts)]
    answers = [[ANSWERS[(i + j * 3) % len(ANSWERS)] for j in range(RESPONSES_PER_PROMPT)] for i in range(num_prompts)]
    return images, questions, answers


# -- ours -------------------------------------------------------------------------------------------------------------
class ListwiseStep:
    def __init__(self, vlm, images, questions, answers):
        self.vlm = vlm
        self.pixels = vlm.preprocess_images(images)
        self.prompts = [vlm.prompt_tokens(q) for q in questions]
        self.responses = [[vlm.answer_tokens(p, a) for a in texts] for p, texts in zip(self.prompts, answers)]
        self.cached_reference = torch.zeros(len(questions), RESPONSES_PER_PROMPT, device=vlm.device)
        self.last = {}

    def __call__(self, *, cached_reference: bool) -> None:
        vlm = self.vlm
        vlm.model.zero_grad(set_to_none=True)
        visual = vlm.encode_images(self.pixels)
        batch = pack_examples(vlm.embed_tokens, [ListwiseExample(p, r, visual[i]) for i, (p, r)
                                                 in enumerate(zip(self.prompts, self.responses))])
        if cached_reference:
            reference = self.cached_reference
        else:
            with torch.no_grad(), vlm.adapter_disabled():
                reference = listwise_logprobs(vlm, batch)
        loss, _ = mlpo_loss(listwise_logprobs(vlm, batch), reference, gamma=BETA, valid=batch.valid)
        loss.backward()
        passes = 1 if cached_reference else 2
        self.last = {"decoder_tokens": passes * batch.num_real_tokens,
                     "padded_decoder_tokens": passes * batch.inputs_embeds.shape[0] * batch.inputs_embeds.shape[1],
                     "vocabulary_projections": passes * int(batch.score_labels.numel()),
                     "image_encodings": len(self.prompts)}


# -- TRL --------------------------------------------------------------------------------------------------------------
def pairs_of(images, questions, answers, vlm):
    """The 6 (better, worse) pairs of every list as TRL's vision preference examples, text as our prompt shows it."""
    tokenizer = vlm.tokenizer
    examples = []
    for image, question, texts in zip(images, questions, answers):
        prompt = vlm.prompt_tokens(question)
        prompt_text = (tokenizer.bos_token or "") + prompt.text
        for better, worse in itertools.combinations(range(len(texts)), 2):
            examples.append({"images": [image], "prompt": prompt_text,
                             "chosen": prompt.answer_separator.lstrip() + texts[better] + tokenizer.eos_token,
                             "rejected": prompt.answer_separator.lstrip() + texts[worse] + tokenizer.eos_token})
    return examples


def build_trl_trainer(vlm, examples, output_dir, device):
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    args = DPOConfig(output_dir=str(output_dir), beta=BETA, loss_type=["sigmoid"], max_length=None,
                     per_device_train_batch_size=len(examples), gradient_checkpointing=False,
                     bf16=vlm.dtype == torch.bfloat16, use_cpu=device.type == "cpu", report_to=[],
                     remove_unused_columns=False, dataloader_num_workers=0, save_strategy="no", logging_strategy="no")
    return DPOTrainer(model=vlm.model, args=args, train_dataset=Dataset.from_list(examples),
                      processing_class=vlm.processor)


@contextlib.contextmanager
def trl_answer_only():
    """TRL's GPU scoring on any device: `_use_triton` in `trl.trainer.utils` decides whether only the answer positions
    (`compact`) or every position is projected onto the vocabulary; forcing it true changes nothing else (TRL's
    chunked log-prob kernel reads its own copy of the check, so its torch tiles still run on CPU)."""
    import trl.trainer.utils as trl_utils

    shipped = trl_utils._use_triton
    trl_utils._use_triton = lambda device: True
    try:
        yield
    finally:
        trl_utils._use_triton = shipped


class TrlStep:
    def __init__(self, trainer, examples):
        self.trainer = trainer
        self.inputs = trainer._prepare_inputs(trainer.data_collator([dict(e) for e in examples]))
        self.last = {}

    def __call__(self, *, answer_only: bool) -> None:
        trainer, inputs = self.trainer, self.inputs
        trainer.model.zero_grad(set_to_none=True)
        with trl_answer_only() if answer_only else contextlib.nullcontext():
            import trl.trainer.utils as trl_utils

            compact = trl_utils._use_triton(inputs["input_ids"].device)
            loss = trainer.compute_loss(trainer.model, dict(inputs))
            loss.backward()
        real = int(inputs["attention_mask"].sum())
        completion = int(inputs["completion_mask"][:, 1:].sum())
        rows, length = inputs["input_ids"].shape
        self.last = {"decoder_tokens": 2 * real, "padded_decoder_tokens": 2 * rows * length,
                     "vocabulary_projections": 2 * (completion if compact else rows * (length - 1)),
                     "image_encodings": 2 * rows}


# -- measuring --------------------------------------------------------------------------------------------------------
def decoder_linear_parameters(vlm) -> int:
    """Parameters of the decoder's linear layers (what 2·N·tokens counts): not the embeddings, norms, LoRA factors or
    lm_head (both sides project only answer positions, a negligible share at the 7B shape)."""
    return sum(p.numel() for name, p in vlm.language_model.named_parameters()
               if name.endswith(".weight") and not any(part in name for part in ("lora_", "norm", "embed_tokens")))


def measured_bf16_matmul_rate(device) -> float:
    """FLOP/s of a large bf16 matmul on this device (the ceiling MFU is read against, next to the data sheet)."""
    import time

    a = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize(device)
    start, repeats = time.perf_counter(), 20
    for _ in range(repeats):
        a @ b
    torch.cuda.synchronize(device)
    return 2 * 8192 ** 3 * repeats / (time.perf_counter() - start)


def summarise(samples: list[tuple[float, int | None]]) -> dict:
    times = [seconds for seconds, _ in samples]
    peaks = [peak for _, peak in samples if peak is not None]
    return {"time_s": min(times), "time_median_s": statistics.median(times), "time_max_s": max(times),
            "times_s": times, "peak_mib": max(peaks) / 2 ** 20 if peaks else None}


def ratio(peer: dict, ours: dict) -> dict:
    """peer / ours: step time (best over rounds, and median), peak memory, and the median of per-round time ratios
    (rounds alternate, so round r of both forms shared the machine's state)."""
    per_round = [p / o for p, o in zip(peer["times_s"], ours["times_s"])]
    return {"time_best": peer["time_s"] / ours["time_s"], "time_median": peer["time_median_s"] / ours["time_median_s"],
            "time_per_round_min": min(per_round), "time_per_round_median": statistics.median(per_round),
            "time_per_round_max": max(per_round),
            "memory": (peer["peak_mib"] / ours["peak_mib"]) if peer["peak_mib"] and ours["peak_mib"] else None}


def test_mlpo_step_vs_trl_dpo(record_bench_result, step_measure, tmp_path):
    pytest.importorskip("trl", reason="the pairwise peer is TRL's DPOTrainer (pip install -e .[bench])")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    shape = os.environ.get("HSCR_BENCH_SHAPE", "7b" if device.type == "cuda" else "2x384")
    rounds = int(os.environ.get("HSCR_BENCH_ROUNDS", 3))
    threads = torch.get_num_threads()
    if device.type == "cpu" and step_measure.cpu_threads:
        # On a shared CPU, several OpenMP threads charge a form for its number of ops, not its work (see conftest):
        # measured here, the listwise step ran 20x slower on 2 threads than on 1 while other processes were busy.
        torch.set_num_threads(step_measure.cpu_threads)
    try:
        compare_steps(record_bench_result, step_measure, tmp_path, device, shape, rounds)
    finally:
        torch.set_num_threads(threads)


def compare_steps(record_bench_result, step_measure, tmp_path, device, shape, rounds):
    vlm, dtype = build_model(device, shape)
    vlm.model.train()
    image_size = vlm.config.vision_config.image_size
    images, questions, answers = make_lists(PROMPTS_PER_STEP, image_size)
    ours = ListwiseStep(vlm, images, questions, answers)
    examples = pairs_of(images, questions, answers, vlm)
    trl_step = TrlStep(build_trl_trainer(vlm, examples, tmp_path / "trl", device), examples)

    forms = {"ours": lambda: ours(cached_reference=False),
             "ours_cached_reference": lambda: ours(cached_reference=True),
             "trl_shipped": lambda: trl_step(answer_only=False)}
    if device.type == "cpu":
        forms["trl_answer_only"] = lambda: trl_step(answer_only=True)
    flex = device.type == "cuda" and flex_attention_preferred(vlm, device)
    if flex:
        def ours_flex():
            vlm.language_model.set_attn_implementation(FLEX_ATTENTION)
            try:
                ours(cached_reference=False)
            finally:
                vlm.language_model.set_attn_implementation("sdpa")
        forms["ours_flex"] = ours_flex

    accounting, failed = {}, {}
    for name, fn in list(forms.items()):  # warm-up (compilation, allocator) and per-step token accounting
        try:
            fn()
        except torch.cuda.OutOfMemoryError as error:  # a form that does not fit is a result, not a crash
            failed[name] = f"out of memory: {str(error).splitlines()[0]}"
            del forms[name]
            vlm.model.zero_grad(set_to_none=True)
            torch.cuda.empty_cache()
            continue
        accounting[name] = dict((trl_step if name.startswith("trl") else ours).last)
    samples = {name: [] for name in forms}
    for _ in range(rounds):
        for name, fn in forms.items():
            samples[name].append(step_measure(fn, device))
    summary = {name: summarise(samples[name]) | accounting[name] for name in forms}

    answer_only = "trl_answer_only" if device.type == "cpu" else "trl_shipped"  # TRL's CUDA path scores answers only
    wanted = {"trl_shipped / ours": ("trl_shipped", "ours"), "trl_answer_only / ours": (answer_only, "ours"),
              "trl_answer_only / ours_cached_reference": (answer_only, "ours_cached_reference"),
              "ours_flex / ours": ("ours_flex", "ours")}
    vs = {key: ratio(summary[peer], summary[base]) for key, (peer, base) in wanted.items()
          if peer in summary and base in summary}
    result = {
        "peer": f"trl {__import__('trl').__version__} DPOTrainer (sigmoid loss) on the 6 pairs of each k = 3 list",
        "trl_mode_on_this_device": ("answer positions only (TRL's CUDA/XPU path)" if device.type == "cuda" else
                                    "every position projected onto the vocabulary (TRL's path off CUDA/XPU)"),
        "device": step_measure.device_label(device), "threads": torch.get_num_threads(),
        "load_average_at_start": os.getloadavg(), "note": os.environ.get("HSCR_BENCH_NOTE", ""),
        "shape": shape, "dtype": str(dtype), "prompts_per_step": PROMPTS_PER_STEP,
        "responses_per_prompt": RESPONSES_PER_PROMPT, "pairs_per_prompt": len(examples) // PROMPTS_PER_STEP,
        "lora_rank": LORA_RANK, "image_tokens": vlm.num_visual_tokens, "vocab": vlm.lm_head_weight.shape[0],
        "decoder_width": vlm.hidden_size, "decoder_layers": vlm.config.text_config.num_hidden_layers,
        "answer_tokens": [len(r) for response_list in ours.responses for r in response_list],
        "rounds": rounds, "time": "best and median over rounds; ratios peer / ours",
        "forms": summary, "ratios": vs, "failed": failed,
    }
    if device.type == "cuda":
        result |= cuda_extras(vlm, forms, summary, device, step_measure)
    record_bench_result("mlpo_step_vs_trl", result)
    print(f"\n[{result['device']}, {shape}, {dtype}] " + "; ".join(
        f"{name}: x{r['time_best']:.2f} best, x{r['time_median']:.2f} median, memory "
        f"x{r['memory'] if r['memory'] is None else round(r['memory'], 2)}" for name, r in vs.items()))
    assert "ours" in summary, failed
    # The listwise step must beat the pairwise recipe it replaces, with the same reference handling.
    if "trl_answer_only / ours" in vs:
        assert vs["trl_answer_only / ours"]["time_median"] > 1.0, vs


def cuda_extras(vlm, forms, summary, device, step_measure) -> dict:
    """Model FLOPs utilisation on real tokens, and peak memory with gradient checkpointing (non-reentrant)."""
    matmul_rate = measured_bf16_matmul_rate(device)
    name = torch.cuda.get_device_name(device)
    nominal = next((rate for key, rate in NOMINAL_BF16_FLOPS.items() if key in name), None)
    linear = decoder_linear_parameters(vlm)
    mfu = {}
    for form, figures in summary.items():
        # LoRA leaves the base weights frozen: forward 2·N·t, backward 2·N·t (input gradients only); a reference
        # pass is forward only. Attention scores and the vision tower are not counted (a lower bound).
        passes = 2 if form in ("ours", "ours_flex") or form.startswith("trl") else 1
        trained_tokens = figures["decoder_tokens"] / passes
        flops = 4 * linear * trained_tokens + 2 * linear * (figures["decoder_tokens"] - trained_tokens)
        mfu[form] = {"model_tflops": flops / 1e12, "of_measured_matmul_rate": flops / figures["time_s"] / matmul_rate,
                     "of_nominal_bf16": flops / figures["time_s"] / nominal if nominal else None}
    checkpointed = {}
    vlm.llava.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    try:
        for form in [f for f in ("ours", "ours_cached_reference", "ours_flex", "trl_shipped") if f in forms]:
            try:
                seconds, peak = step_measure(forms[form], device)
                checkpointed[form] = {"time_s": seconds, "peak_mib": peak / 2 ** 20}
            except torch.cuda.OutOfMemoryError as error:
                checkpointed[form] = {"failed": f"out of memory: {str(error).splitlines()[0]}"}
                vlm.model.zero_grad(set_to_none=True)
                torch.cuda.empty_cache()
    finally:
        vlm.llava.gradient_checkpointing_disable()
    return {"measured_bf16_matmul_tflops": matmul_rate / 1e12, "nominal_bf16_tflops": nominal and nominal / 1e12,
            "decoder_linear_parameters": linear, "mfu_on_real_tokens": mfu,
            "with_gradient_checkpointing": checkpointed}
