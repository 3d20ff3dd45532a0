"""Batched greedy generation with a KV cache, from spliced image+text prefixes.

Prompts are left-padded so every row's next token sits in the last column; positions count only real (non-pad)
tokens, so a row generates exactly what it would generate alone. With Qwen2-VL's 3D rotary positions the prompt's
come from its image's layout and generated tokens continue as text (models/positions.py). Visual tokens removed by
dropout (`remove`) are simply absent; masked ones (`mask`) stay in place with their positions but no query attends
to them.
Only the last position's hidden state is projected onto the vocabulary at each step.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from hscr_fast.models.positions import VisualLayout, prefix_positions
from hscr_fast.models.prompting import PromptTokens


@dataclass
class GenerationPrompt:
    prompt: PromptTokens
    visual_tokens: torch.Tensor  # [N, D]
    visual_attendable: torch.Tensor | None = None  # bool [N]; False = masked out
    visual_layout: VisualLayout | None = None  # Qwen2-VL: 3D rotary positions of the visual tokens


def _prefix_embeddings(vlm, item: GenerationPrompt) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """(embeddings [P, D], attendable [P], positions [P] or [3, P], the position of the first generated token)."""
    before = vlm.embed_tokens(torch.tensor(item.prompt.before_image, dtype=torch.long))
    after = vlm.embed_tokens(torch.tensor(item.prompt.after_image, dtype=torch.long))
    visual = item.visual_tokens.to(before.dtype)
    attendable = torch.ones(before.shape[0] + visual.shape[0] + after.shape[0], dtype=torch.bool, device=vlm.device)
    if item.visual_attendable is not None:
        attendable[before.shape[0]:before.shape[0] + visual.shape[0]] = item.visual_attendable.to(vlm.device)
    positions, next_position = prefix_positions(before.shape[0], visual.shape[0], after.shape[0], item.visual_layout,
                                                device=vlm.device)
    return torch.cat([before, visual, after]), attendable, positions, next_position


@torch.no_grad()
def greedy_generate(vlm, items: list[GenerationPrompt], *, max_new_tokens: int = 64) -> list[list[int]]:
    """Greedy continuation of each prompt: token ids up to (not including) EOS, at most `max_new_tokens`."""
    if not items:
        return []
    prefixes = [_prefix_embeddings(vlm, item) for item in items]
    batch, width = len(items), max(prefix[0].shape[0] for prefix in prefixes)
    mrope = items[0].visual_layout is not None
    hidden_size = prefixes[0][0].shape[-1]
    embeds = torch.zeros(batch, width, hidden_size, dtype=prefixes[0][0].dtype, device=vlm.device)
    key_mask = torch.zeros(batch, width, dtype=torch.long, device=vlm.device)
    positions = torch.zeros(*((3,) if mrope else ()), batch, width, dtype=torch.long, device=vlm.device)
    for row, (row_embeds, attendable, row_positions, _) in enumerate(prefixes):
        length = row_embeds.shape[0]
        embeds[row, width - length:] = row_embeds
        key_mask[row, width - length:] = attendable.long()
        positions[..., row, width - length:] = row_positions
    next_position = torch.tensor([prefix[3] for prefix in prefixes], dtype=torch.long, device=vlm.device)

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
        step_positions = next_position[:, None].expand(3, -1, -1) if mrope else next_position[:, None]
        hidden, cache = vlm.decoder_hidden_states(vlm.embed_tokens(next_token[:, None]), key_mask, step_positions,
                                                  past_key_values=cache, use_cache=True)
        next_position = next_position + 1
    outputs = []
    for row in generated.tolist():
        tokens = [t for t in row if t != -1]
        outputs.append(tokens[:tokens.index(eos)] if eos in tokens else tokens)
    return outputs


def decode(vlm, token_ids: list[int]) -> str:
    return vlm.tokenizer.decode(token_ids, skip_special_tokens=True).strip()
