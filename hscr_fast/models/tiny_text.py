"""Tiny text-only causal language models built in code (Llama, Mistral or Qwen2 decoders with random weights and a
working tokenizer), for the tests of the text-only listwise path. Nothing touches the network.

The Qwen2 variant is built like the real family: no BOS token, a chat template, and the output head tied to the
input embedding (so one matrix receives gradients from both ends).
"""
from __future__ import annotations

from pathlib import Path

import torch

from hscr_fast.models.tiny import BASE_CORPUS, QWEN_CHAT_TEMPLATE, QWEN_SPECIAL_TOKENS, train_tokenizer

TEXT_DECODERS = ("llama", "mistral", "qwen2")


def build_tiny_causal_lm(decoder: str = "llama", *, seed: int = 0, chat_template: bool | None = None,
                         attn_implementation: str = "sdpa", corpus: list[str] | None = None):
    """(model, tokenizer). `chat_template` defaults to the family's habit: Qwen2 has one, the base Llama and Mistral
    checkpoints do not."""
    from transformers import (
        LlamaConfig,
        LlamaForCausalLM,
        MistralConfig,
        MistralForCausalLM,
        Qwen2Config,
        Qwen2ForCausalLM,
    )

    if decoder not in TEXT_DECODERS:
        raise ValueError(f"decoder must be one of {TEXT_DECODERS}, got {decoder!r}")
    tokenizer = train_tokenizer(BASE_CORPUS + list(corpus or []), 512)
    if decoder == "qwen2":
        tokenizer.add_special_tokens({"additional_special_tokens": QWEN_SPECIAL_TOKENS})
        tokenizer.bos_token = None
    if chat_template if chat_template is not None else decoder == "qwen2":
        tokenizer.chat_template = QWEN_CHAT_TEMPLATE
    shape = dict(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                 bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                 pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=decoder == "qwen2")
    config, model_class = {"llama": (LlamaConfig, LlamaForCausalLM),
                           "mistral": (MistralConfig, MistralForCausalLM),
                           "qwen2": (Qwen2Config, Qwen2ForCausalLM)}[decoder]
    config = config(**shape)
    config._attn_implementation = attn_implementation
    torch.manual_seed(seed)
    return model_class(config).eval(), tokenizer


def save_tiny_causal_lm(out_dir: str | Path, decoder: str = "llama", **options) -> Path:
    """Builds a tiny causal LM and writes it as a standard transformers checkpoint directory (safetensors)."""
    out_dir = Path(out_dir)
    model, tokenizer = build_tiny_causal_lm(decoder, **options)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir
