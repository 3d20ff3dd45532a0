"""Tiny real-architecture LLaVA models built in code: CLIP vision tower + MLP projector + Mistral (or Llama) decoder,
random weights, a working tokenizer and processor. Used by the tests and as the starting point of the demo model.

Nothing here touches the network: the tokenizer is a small BPE trained in memory on a word list, wrapped in
transformers' `PreTrainedTokenizerFast`, so it saves and reloads with `AutoTokenizer` like any real one.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import torch

from hscr_fast.models.prompting import IMAGE_PLACEHOLDER, VICUNA_V1_SYSTEM

SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>", IMAGE_PLACEHOLDER]

# Enough English for the conversation scaffold and test sentences; callers add their own domain corpus.
BASE_CORPUS = [
    VICUNA_V1_SYSTEM,
    "USER: ASSISTANT:",
    "Is there a lesion in the left lung? yes no",
    "Where is the abnormality? The right upper lobe shows a small nodule.",
    "What organ is shown in this image? chest abdomen brain head neck liver kidney heart lung",
    "How many lesions are there? zero one two three four five 0 1 2 3 4 5 6 7 8 9 10",
    "What modality is used? CT MRI X-ray ultrasound. Is this a normal image? Describe the image.",
    "large small left right upper lower lobe lesion nodule mass effusion pneumonia fracture none seen",
    "a an the of in on at with and or is are was were this that there these those which what where how",
]


@dataclass
class TinyLlavaSpec:
    """Shapes of a tiny LLaVA; the defaults give a model that runs a forward in milliseconds on one CPU core."""

    image_size: int = 56
    patch_size: int = 14
    vision_hidden: int = 32
    vision_layers: int = 2
    vision_heads: int = 2
    text_hidden: int = 64
    text_layers: int = 2
    text_heads: int = 4
    text_kv_heads: int = 2
    text_intermediate: int = 128
    tokenizer_vocab: int = 512
    max_position_embeddings: int = 2048
    seed: int = 0
    corpus: list[str] = field(default_factory=list)
    text_model: str = "mistral"  # or "llama" (LLaVA-1.5 / Vicuna-style decoders)
    # "llava"; "llava-next": anyres tiling on a grid of 1x1 to 2x2 tiles of image_size; "qwen2-vl" and
    # "qwen2.5-vl": dynamic resolution (4 to 16 merged tokens per image) and 3D rotary positions. In the last three
    # the number of visual tokens depends on the image's size.
    family: str = "llava"


def train_tokenizer(corpus: Iterable[str], vocab_size: int):
    """A SentencePiece-style (Metaspace + BPE) fast tokenizer trained in memory, like Mistral's in behaviour."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE(unk_token="<unk>", fuse_unk=True, byte_fallback=False))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tokenizer.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
    alphabet = sorted(set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.,:;?!'\"()-/%▁\n"))
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, initial_alphabet=alphabet,
                                  show_progress=False)
    tokenizer.train_from_iterator(list(corpus), trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<pad>",
        additional_special_tokens=[IMAGE_PLACEHOLDER], padding_side="left",
    )


def build_tiny_llava(spec: TinyLlavaSpec | None = None, attn_implementation: str = "sdpa"):
    """Returns (model, processor) with random weights. `processor.tokenizer` and `processor.image_processor` work."""
    from transformers import (
        CLIPImageProcessorPil,
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaNextConfig,
        LlavaNextForConditionalGeneration,
        LlavaNextImageProcessorPil,
        LlavaNextProcessor,
        LlavaProcessor,
        MistralConfig,
    )

    spec = spec or TinyLlavaSpec()
    if spec.family in ("qwen2-vl", "qwen2.5-vl"):
        return build_tiny_qwen2_vl(spec, attn_implementation)
    tokenizer = train_tokenizer(BASE_CORPUS + list(spec.corpus), spec.tokenizer_vocab)
    image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_PLACEHOLDER)
    vision_config = CLIPVisionConfig(
        hidden_size=spec.vision_hidden, intermediate_size=spec.vision_hidden * 4, num_hidden_layers=spec.vision_layers,
        num_attention_heads=spec.vision_heads, image_size=spec.image_size, patch_size=spec.patch_size,
        projection_dim=spec.vision_hidden,
    )
    text_shape = dict(
        vocab_size=len(tokenizer), hidden_size=spec.text_hidden, intermediate_size=spec.text_intermediate,
        num_hidden_layers=spec.text_layers, num_attention_heads=spec.text_heads,
        num_key_value_heads=spec.text_kv_heads, max_position_embeddings=spec.max_position_embeddings,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False,
    )
    if spec.text_model == "mistral":
        text_config = MistralConfig(sliding_window=None, **text_shape)
    elif spec.text_model == "llama":
        text_config = LlamaConfig(**text_shape)
    else:
        raise ValueError(f"TinyLlavaSpec.text_model must be 'mistral' or 'llama', got {spec.text_model!r}")
    num_patches = (spec.image_size // spec.patch_size) ** 2
    common = dict(vision_config=vision_config, text_config=text_config, image_token_index=image_token_id,
                  projector_hidden_act="gelu", vision_feature_select_strategy="default", vision_feature_layer=-2)
    sizes = dict(size={"shortest_edge": spec.image_size},
                 crop_size={"height": spec.image_size, "width": spec.image_size},
                 do_center_crop=True, do_resize=True, do_normalize=True)
    # The PIL image processors: torchvision (the default backend) has no build that installs beside the CPU torch
    # we pin.
    if spec.family == "llava":
        config, model_class = LlavaConfig(image_seq_length=num_patches, **common), LlavaForConditionalGeneration
        image_processor = CLIPImageProcessorPil(**sizes)
        processor_class = LlavaProcessor
    elif spec.family == "llava-next":
        side = spec.image_size
        grid = [[side, side], [side, 2 * side], [2 * side, side], [2 * side, 2 * side]]
        config = LlavaNextConfig(image_grid_pinpoints=grid, image_seq_length=num_patches, **common)
        model_class = LlavaNextForConditionalGeneration
        image_processor = LlavaNextImageProcessorPil(image_grid_pinpoints=grid, **sizes)
        processor_class = LlavaNextProcessor
    else:
        raise ValueError(f"TinyLlavaSpec.family must be 'llava' or 'llava-next', got {spec.family!r}")
    config._attn_implementation = attn_implementation
    torch.manual_seed(spec.seed)
    model = model_class(config).eval()
    processor = processor_class(image_processor=image_processor, tokenizer=tokenizer, patch_size=spec.patch_size,
                                vision_feature_select_strategy="default", num_additional_image_tokens=1)
    return model, processor


QWEN_SPECIAL_TOKENS = ["<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>",
                       "<|video_pad|>"]
# Qwen2-VL's chat layout, reduced to what a single-image question needs.
QWEN_CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                      "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def build_tiny_qwen2_vl(spec: TinyLlavaSpec, attn_implementation: str = "sdpa"):
    """A tiny Qwen2-VL (or Qwen2.5-VL, whose vision tower adds windowed attention): vision transformer with 2x2 token
    merging, Qwen2 decoder with M-RoPE, a chat template. Returns (model, TextAndImageProcessor): Qwen2-VL's own
    processor needs torchvision, which the CPU test environment cannot install."""
    from transformers import (
        Qwen2_5_VLConfig,
        Qwen2_5_VLForConditionalGeneration,
        Qwen2VLConfig,
        Qwen2VLForConditionalGeneration,
        Qwen2VLImageProcessorPil,
    )

    from hscr_fast.models.vlm import TextAndImageProcessor

    tokenizer = train_tokenizer(BASE_CORPUS + list(spec.corpus), spec.tokenizer_vocab)
    tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE_PLACEHOLDER] + QWEN_SPECIAL_TOKENS})
    tokenizer.chat_template = QWEN_CHAT_TEMPLATE
    token_id = tokenizer.convert_tokens_to_ids
    head_dim = spec.text_hidden // spec.text_heads
    section = [head_dim // 2 - 2 * (head_dim // 6), head_dim // 6, head_dim // 6]  # (t, h, w) halves of rotary dims
    vision = dict(depth=spec.vision_layers, num_heads=spec.vision_heads, patch_size=spec.patch_size,
                  spatial_merge_size=2, temporal_patch_size=2)
    if spec.family == "qwen2-vl":
        config_class, model_class = Qwen2VLConfig, Qwen2VLForConditionalGeneration
        vision.update(embed_dim=spec.vision_hidden, hidden_size=spec.text_hidden, mlp_ratio=4)
    else:  # windows of 2x2 merged tokens; the last layer attends to the whole image
        config_class, model_class = Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
        vision.update(hidden_size=spec.vision_hidden, out_hidden_size=spec.text_hidden,
                      intermediate_size=spec.vision_hidden * 4, window_size=4 * spec.patch_size,
                      fullatt_block_indexes=[spec.vision_layers - 1])
    config = config_class(
        vision_config=vision,
        text_config=dict(vocab_size=len(tokenizer), hidden_size=spec.text_hidden,
                         intermediate_size=spec.text_intermediate, num_hidden_layers=spec.text_layers,
                         num_attention_heads=spec.text_heads, num_key_value_heads=spec.text_kv_heads,
                         max_position_embeddings=spec.max_position_embeddings, tie_word_embeddings=False,
                         rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": section},
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id),
        image_token_id=token_id("<|image_pad|>"), video_token_id=token_id("<|video_pad|>"),
        vision_start_token_id=token_id("<|vision_start|>"), vision_end_token_id=token_id("<|vision_end|>"),
        tie_word_embeddings=False,
    )
    config._attn_implementation = attn_implementation
    torch.manual_seed(spec.seed)
    model = model_class(config).eval()
    merged = spec.patch_size * 2  # one visual token per merged 2x2 patch block
    image_processor = Qwen2VLImageProcessorPil(min_pixels=4 * merged ** 2, max_pixels=16 * merged ** 2,
                                               patch_size=spec.patch_size, merge_size=2, temporal_patch_size=2)
    return model, TextAndImageProcessor(tokenizer, image_processor)


def save_tiny_llava(out_dir: str | Path, spec: TinyLlavaSpec | None = None) -> Path:
    """Builds a tiny LLaVA and writes it as a standard transformers checkpoint directory (safetensors)."""
    out_dir = Path(out_dir)
    model, processor = build_tiny_llava(spec)
    model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    return out_dir
