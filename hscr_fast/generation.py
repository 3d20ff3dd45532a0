"""Batched greedy generation with a KV cache, from spliced image+text prefixes.

Prompts are left-padded so every row's next token sits in the last column; positions count only real (non-pad)
tokens, so a row generates exactly what it would generate alone. Visual tokens removed by dropout (`remove`) are
simply absent; masked ones (`mask`) stay in place with their positions but no query attends to them.
Only the last position's hidden state is projected onto the vocabulary at each step.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .models.prompting import PromptTokens


@dataclass
class GenerationPrompt:
    prompt: PromptTokens
    visual_tokens: torch.Tensor  # [N, D]
    visual_attendable: torch.Tensor | None = None  # bool [N]; False = masked out


def _prefix_embeddings(vlm, item: GenerationPrompt) -> tuple[torch.Tensor, torch.Tensor]:
    before = vlm.embed_tokens(torch.tensor(item.prompt.before_image, dtype=torch.long))
    after = vlm.embed_tokens(torch.tensor(item.prompt.after_image, dtype=torch.long))
    visual = item.visual_tokens.to(before.dtype)
    attendable = torch.ones(before.shape[0] + visual.shape[0] + after.shape[0], dtype=torch.bool, device=vlm.device)
    if item.visual_attendable is not None:
        attendable[before.shape[0]:before.shape[0] + visual.shape[0]] = item.visual_attendable.to(vlm.device)
    return torch.cat([before, visual, after]), attendable


@torch.no_grad()
def greedy_generate(vlm, items: list[GenerationPrompt], *, max_new_tokens: int = 64) -> list[list[int]]:
    """Greedy continuation of each prompt: token ids up to (not including) EOS, at most `max_new_tokens`."""
    if not items:
        return []
    prefixes = [_prefix_embeddings(vlm, item) for item in items]
    batch, width = len(items), max(embeds.shape[0] for embeds, _ in prefixes)
    hidden_size = prefixes[0][0].shape[-1]
    embeds = torch.zeros(batch, width, hidden_size, dtype=prefixes[0][0].dtype, device=vlm.device)
    key_mask = torch.zeros(batch, width, dtype=torch.long, device=vlm.device)
    positions = torch.zeros(batch, width, dtype=torch.long, device=vlm.device)
    for row, (row_embeds, attendable) in enumerate(prefixes):
        length = row_embeds.shape[0]
        embeds[row, width - length:] = row_embeds
        key_mask[row, width - length:] = attendable.long()
        positions[row, width - length:] = torch.arange(length, device=vlm.device)
    next_position = positions[:, -1] + 1

    eos = vlm.tokenizer.eos_token_id
    weight = vlm.lm_head_weight
    hidden, cache = vlm.decoder_hidden_states(embeds, key_mask, positions, use_cache=True)
    generated = torch.full((batch, max_new_tokens), -1, dtype=torch.long, device=vlm.device)
    finished = torch.zeros(batch, dtype=torch.bool, device=vlm.device)
    for step in range(max_new_tokens):
        next_token = (hidden[:, -1].float() @ weight.float().T).argmax(-1)
        next_token = torch.where(finished, torch.full_like(next_token, eos), next_token)
        generated[:, step] = next_token
        finished |= next_token == eos
        if bool(finished.all()) or step == max_new_tokens - 1:
            break
        key_mask = torch.cat([key_mask, torch.ones(batch, 1, dtype=torch.long, device=vlm.device)], dim=1)
        hidden, cache = vlm.decoder_hidden_states(vlm.embed_tokens(next_token[:, None]), key_mask,
                                                  next_position[:, None], past_key_values=cache, use_cache=True)
        next_position = next_position + 1
    outputs = []
    for row in generated.tolist():
        tokens = [t for t in row if t != -1]
        outputs.append(tokens[:tokens.index(eos)] if eos in tokens else tokens)
    return outputs


def decode(vlm, token_ids: list[int]) -> str:
    return vlm.tokenizer.decode(token_ids, skip_special_tokens=True).strip()
