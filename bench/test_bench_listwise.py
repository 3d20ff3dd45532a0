"""MLPO step throughput: the prefix-shared listwise forward against the padded pairwise DPO recipe.

Both compute the same loss on the same model and data: every prompt has a k = 3 list (y_w ≻ y_l1 ≻ y_l2 ≻ y_l3), so
MLPO's explicit + implicit terms are the DPO losses of its 6 pairs.
- listwise: one packed row per prompt (vision tower once, prefix once, Σ answers), log-probs via
  `fused_linear_logprobs` over answer positions only.
- pairwise (the common DPO recipe): each of the 6 pairs is its own chosen/rejected pair of sequences, image and
  prompt repeated per sequence, right-padded, full [sequences, length, vocab] logits → log_softmax → gather.

A step is forward + backward of the loss over a batch of prompts. Both are timed alternately in one run (best of
the rounds) and the ratio is reported with shapes, dtype and device. On CPU the model is small but wide (a 32000-token
vocabulary, many image tokens, short answers: the VQA regime); on CUDA a LLaVA-Med-7B-shaped model with random
weights (CLIP ViT-L/14@336 + Mistral-7B, 576 image tokens) runs instead, with peak memory and MFU.
"""
from __future__ import annotations

import itertools
import time

import torch

from hscr_fast.listwise import ListwiseExample, listwise_logprobs, pack_examples
from hscr_fast.losses import mlpo_loss

ANSWERS = ["yes", "no", "left upper lobe", "right lower lobe nodule", "two", "a small lesion", "none", "large"]


def build_model(device):
    from transformers import CLIPVisionConfig, LlavaConfig, LlavaForConditionalGeneration, MistralConfig

    from hscr_fast.models.tiny import TinyLlavaSpec, build_tiny_llava
    from hscr_fast.models.vlm import VisionLanguageModel

    if device.type == "cpu":
        # Small but wide: 144 image tokens, a 32000-token vocabulary, 2 decoder layers of width 384.
        spec = TinyLlavaSpec(image_size=168, patch_size=14, vision_hidden=64, vision_layers=2, text_hidden=384,
                             text_layers=2, text_heads=6, text_kv_heads=2, text_intermediate=768)
        model, processor = build_tiny_llava(spec)
        model.resize_token_embeddings(32000, mean_resizing=False)
        return VisionLanguageModel(model.float(), processor), torch.float32
    _, processor = build_tiny_llava()
    vision = CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                              image_size=336, patch_size=14, projection_dim=768)
    text = MistralConfig(vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                         num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=32768,
                         sliding_window=None)
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_index=31999, image_seq_length=576)
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    with torch.device(device):
        model = LlavaForConditionalGeneration(config).to(torch.bfloat16)
    model.requires_grad_(False)
    for name, param in model.named_parameters():  # a LoRA-sized trainable set: the decoder's o_proj weights
        if name.endswith("o_proj.weight"):
            param.requires_grad_(True)
    processor.image_processor.size = {"shortest_edge": 336}
    processor.image_processor.crop_size = {"height": 336, "width": 336}
    return VisionLanguageModel(model, processor), torch.bfloat16


def make_batch(vlm, num_prompts, seed=0):
    generator = torch.Generator().manual_seed(seed)
    pixels = torch.randn(num_prompts, 3, vlm.config.vision_config.image_size, vlm.config.vision_config.image_size,
                         generator=generator)
    prompts = [vlm.prompt_tokens(f"Is there a lesion in the left lung of patient {i}?") for i in range(num_prompts)]
    responses = []
    for i, prompt in enumerate(prompts):
        texts = [ANSWERS[(i + j * 3) % len(ANSWERS)] for j in range(4)]
        responses.append([vlm.answer_tokens(prompt, t) for t in texts])
    return pixels.to(vlm.device, vlm.dtype), prompts, responses


def listwise_step(vlm, pixels, prompts, responses, reference):
    visual = vlm.encode_images(pixels)
    batch = pack_examples(vlm.embed_tokens, [ListwiseExample(p, r, visual[i])
                                             for i, (p, r) in enumerate(zip(prompts, responses))])
    logps = listwise_logprobs(vlm, batch)
    loss, _ = mlpo_loss(logps, reference, valid=batch.valid)
    loss.backward()
    return batch.num_real_tokens


def pairwise_step(vlm, pixels, prompts, responses, reference):
    """Each pair (a ≻ b) of the list as chosen/rejected sequences; image + prompt repeated; full logits."""
    sequences, owners = [], []
    for b, (prompt, response_list) in enumerate(zip(prompts, responses)):
        for better, worse in itertools.combinations(range(len(response_list)), 2):
            for which in (better, worse):
                sequences.append((b, prompt, response_list[which]))
            owners.append((b, better, worse))
    visual = vlm.encode_images(pixels[[b for b, _, _ in sequences]])
    rows = [torch.cat([vlm.embed_tokens(torch.tensor(p.before_image)), visual[i],
                       vlm.embed_tokens(torch.tensor(list(p.after_image) + r[:-1]))])
            for i, (_, p, r) in enumerate(sequences)]
    length = max(row.shape[0] for row in rows)
    embeds = torch.zeros(len(rows), length, rows[0].shape[-1], dtype=rows[0].dtype, device=vlm.device)
    mask = torch.zeros(len(rows), length, dtype=torch.long, device=vlm.device)
    labels = torch.full((len(rows), length), -100, dtype=torch.long, device=vlm.device)
    for i, (row, (_, p, r)) in enumerate(zip(rows, sequences)):
        embeds[i, :row.shape[0]] = row
        mask[i, :row.shape[0]] = 1
        start = row.shape[0] - len(r)  # hidden state at index t predicts token t + 1
        labels[i, start:row.shape[0]] = torch.tensor(r, device=vlm.device)
    hidden = vlm.decoder_hidden_states(embeds, mask)
    logits = (hidden[:, :-1] @ vlm.lm_head_weight.T).float()
    logprobs = torch.log_softmax(logits, -1)
    targets = labels[:, 1:]
    token = logprobs.gather(-1, targets.clamp(min=0)[..., None])[..., 0] * (targets != -100)
    sequence_logps = token.sum(-1)
    loss = 0
    for pair, (b, better, worse) in enumerate(owners):
        chosen, rejected = sequence_logps[2 * pair], sequence_logps[2 * pair + 1]
        margin = 0.1 * ((chosen - reference[b, better]) - (rejected - reference[b, worse]))
        loss = loss - torch.nn.functional.logsigmoid(margin)
    (loss / len(prompts)).backward()
    return int(mask.sum())


def _time_interleaved(forms: dict, device, rounds) -> dict[str, float]:
    """Best-of-rounds seconds per form, the forms alternating within each round so that a slow spell of a shared
    machine falls on both."""
    best = dict.fromkeys(forms, float("inf"))
    for _ in range(rounds):
        for name, fn in forms.items():
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            fn()
            if device.type == "cuda":
                torch.cuda.synchronize()
            best[name] = min(best[name], time.perf_counter() - start)
    return best


def _peak_memory(fn, device):
    if device.type != "cuda":
        return None
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated(device)


def test_listwise_vs_padded_pairwise(benchmark, record_bench_result):
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    vlm, dtype = build_model(device)
    vlm.model.train()
    num_prompts = 2
    pixels, prompts, responses = make_batch(vlm, num_prompts)
    reference = torch.zeros(num_prompts, 4, device=device)

    def run_listwise():
        vlm.model.zero_grad(set_to_none=True)
        return listwise_step(vlm, pixels, prompts, responses, reference)

    def run_pairwise():
        vlm.model.zero_grad(set_to_none=True)
        return pairwise_step(vlm, pixels, prompts, responses, reference)

    listwise_tokens, pairwise_tokens = run_listwise(), run_pairwise()  # warm-up, and token counts
    rounds = 3
    seconds = _time_interleaved({"pairwise": run_pairwise, "listwise": run_listwise}, device, rounds)
    pairwise_seconds, listwise_seconds = seconds["pairwise"], seconds["listwise"]
    benchmark.pedantic(run_listwise, rounds=rounds, iterations=1)
    result = {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else
        f"cpu ({torch.get_num_threads()} threads)",
        "dtype": str(dtype), "prompts_per_step": num_prompts, "responses_per_prompt": 4, "pairs_per_prompt": 6,
        "image_tokens": vlm.num_visual_tokens, "vocab": vlm.lm_head_weight.shape[0],
        "decoder_width": vlm.hidden_size, "decoder_layers": vlm.config.text_config.num_hidden_layers,
        "listwise_tokens_per_step": listwise_tokens, "pairwise_tokens_per_step": pairwise_tokens,
        "listwise_seconds_per_step": listwise_seconds, "pairwise_seconds_per_step": pairwise_seconds,
        "listwise_samples_per_second": num_prompts / listwise_seconds,
        "pairwise_samples_per_second": num_prompts / pairwise_seconds,
        "speedup_samples_per_second": pairwise_seconds / listwise_seconds,
    }
    if device.type == "cuda":
        result["listwise_peak_bytes"] = _peak_memory(run_listwise, device)
        result["pairwise_peak_bytes"] = _peak_memory(run_pairwise, device)
    benchmark.extra_info.update(result)
    record_bench_result("listwise_vs_pairwise", result)
    print(f"\nlistwise {result['listwise_samples_per_second']:.2f} samples/s vs padded pairwise "
          f"{result['pairwise_samples_per_second']:.2f} samples/s: {result['speedup_samples_per_second']:.1f}x "
          f"({result['device']}, {dtype}, {listwise_tokens} vs {pairwise_tokens} tokens/step)")
    assert result["speedup_samples_per_second"] > 1.0
