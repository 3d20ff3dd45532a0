"""The prefix-shared listwise forward, for vision-language and text-only causal language models alike.

A prompt's k+1 responses share the prompt (for a VLM, ~600 tokens of image and question for a 336px image) while
answers are often a few tokens. Each prompt is packed into ONE row:

    [ prefix: text-before-image | visual tokens | text-after-image ][ r0 ][ r1 ] ... [ rk ]

A text-only prompt is the same row without visual tokens: the prefix is the prompt's token ids.

with a 4D boolean attention mask in which prefix tokens attend causally to the prefix and every response token
attends to the whole prefix and causally to its own response, never to another response. Positions restart after
the prefix for each response, so every response sees exactly the positions it would see alone. (With Qwen2-VL's 3D
rotary positions the prefix's positions come from its image's layout, `models/positions.py`, and `position_ids` is
[3, B, L].) One forward
therefore computes `prefix + Σ answers` tokens instead of `(k+1)·(prefix + answer)`, and gradients flow to the
shared prefix once (summed over responses), exactly as in k+1 separate forwards.

The last token of a response is never fed in (nothing is predicted from it): the hidden state that predicts a
response's first token is the prefix's last one, shared by all responses.

Mask choice: on decoders that run flex attention, a FlexAttention BlockMask of the same visibility
(listwise_attention.py), which skips the masked blocks. Otherwise a dense bool mask, which transformers hands to SDPA
unchanged (`attn_implementation="sdpa"`; eager gets it converted to additive form). It costs B·L² bytes (one per
bool: 18 MB for two rows of LLaVA-NeXT's ~3,000 tokens) and lets SDPA use its memory-efficient kernel. It is exact and
backend-independent, and it works with gradient
checkpointing (no KV cache is carried between layers).

Entry points: `pack_examples` builds the row; `listwise_logprobs(model, batch)` runs any model that has
`decoder_hidden_states` and `lm_head_weight` (our wrappers) or is a stock transformers causal LM; users with their own
model class run its decoder on the batch's `inputs_embeds`, `attention_mask` and `position_ids` and hand the final
hidden states and the output head's weight to `response_logprobs`.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from hscr_fast.models.positions import VisualLayout, prefix_positions, text_positions
from hscr_fast.models.prompting import PromptTokens

PREFIX_SEGMENT = 0
PAD_SEGMENT = -1


@dataclass
class ListwiseExample:
    """One prompt with its responses (token ids, EOS included), all conditioned on the same visual tokens, or on
none: `prompt` may be a `PromptTokens` split around an image or, for a text-only model, the prompt's token ids.

    Response j lands in column `output_slots[j]` of output row `output_row` of the [rows, slots] result; by default
    example b fills row b, columns 0..k. A preference list whose responses see different images (image-side
    dispreference: the same answer under a corrupted image) becomes one example per distinct image, all pointing at
    the same output row: a prefix is shared exactly among the responses that see the same image.
    """

    prompt: PromptTokens | Sequence[int]
    responses: list[list[int]]
    visual_tokens: torch.Tensor | None = None  # [N, D] in the language model's embedding space; None: text only
    visual_attendable: torch.Tensor | None = None  # bool [N]; False = masked out (dropout mode "mask")
    output_row: int | None = None
    output_slots: list[int] | None = None
    token_flags: list[list[bool]] | None = None  # per response and token, e.g. "inside a marked clinical span"
    visual_layout: VisualLayout | None = None  # Qwen2-VL: 3D rotary positions of the visual tokens present

    def __post_init__(self):
        if not isinstance(self.prompt, PromptTokens):
            self.prompt = PromptTokens(tuple(int(token) for token in self.prompt), (), text="")
        if not self.prompt.num_text_tokens and self.num_visual_tokens == 0:
            raise ValueError("a listwise example needs a prompt of at least one token (the shared prefix that "
                             "predicts each response's first token)")
        if not self.responses:
            raise ValueError("a listwise example needs at least one response")
        for index, response in enumerate(self.responses):
            if len(response) == 0:
                raise ValueError(f"response {index} is empty (it must at least hold EOS)")
        if self.output_slots is not None and len(self.output_slots) != len(self.responses):
            raise ValueError(f"{len(self.output_slots)} output slots for {len(self.responses)} responses")
        if self.token_flags is not None and [len(f) for f in self.token_flags] != [len(r) for r in self.responses]:
            raise ValueError("token_flags must hold one flag per response token")

    @property
    def num_visual_tokens(self) -> int:
        return 0 if self.visual_tokens is None else self.visual_tokens.shape[0]

    @property
    def prefix_length(self) -> int:
        return self.prompt.num_text_tokens + self.num_visual_tokens

    @property
    def packed_length(self) -> int:
        return self.prefix_length + sum(len(r) - 1 for r in self.responses)


@dataclass
class PackedBatch:
    inputs_embeds: torch.Tensor  # [B, L, D]
    attention_mask: torch.Tensor  # bool [B, 1, L, L], True = may attend
    position_ids: torch.Tensor  # [B, L], or [3, B, L] with 3D rotary positions
    score_rows: torch.Tensor  # [M] flat row index (b·L + position) of the hidden state predicting each answer token
    score_labels: torch.Tensor  # [M] the answer token it predicts
    score_slots: torch.Tensor  # [M] flat output slot (row·S + slot) the token belongs to
    valid: torch.Tensor  # bool [rows, S]: which output slots hold a response
    num_real_tokens: int = 0  # tokens fed through the decoder, padding excluded
    score_flags: torch.Tensor | None = None  # bool [M]: the examples' token_flags (None when no example has any)
    segment_ids: torch.Tensor = field(default=None, repr=False)  # [B, L]: -1 pad, 0 prefix, j+1 response j
    attendable: torch.Tensor = field(default=None, repr=False)  # bool [B, L]: False = no query may see this key
    block_mask: object = field(default=None, repr=False)  # FlexAttention form of attention_mask, made on first use

    @property
    def num_slots(self) -> int:
        return self.valid.shape[1]


def pack_examples(embed_tokens, examples: list[ListwiseExample], *, device=None) -> PackedBatch:
    """Builds the packed rows. `embed_tokens(ids [n]) -> [n, D]` is the model's text embedding (a wrapper's
    `embed_tokens`, or a transformers model's `get_input_embeddings()`). The batch lives on `device`, by default the
    visual tokens' device, else the embedding's."""
    if not examples:
        raise ValueError("pack_examples needs at least one example")
    with_image = [ex for ex in examples if ex.visual_tokens is not None]
    device = device or (with_image[0].visual_tokens.device if with_image else _module_device(embed_tokens))
    rows_out = [b if ex.output_row is None else ex.output_row for b, ex in enumerate(examples)]
    slots_out = [list(range(len(ex.responses))) if ex.output_slots is None else list(ex.output_slots)
                 for ex in examples]
    length = max(ex.packed_length for ex in examples)
    slots = max(max(s) for s in slots_out) + 1
    mrope = examples[0].visual_layout is not None
    if any((ex.visual_layout is not None) != mrope for ex in examples):
        raise ValueError("either every example of a batch has a visual layout (3D rotary positions) or none has")

    # One embedding call for all text in the batch.
    text_ids = []
    for ex in examples:
        text_ids += list(ex.prompt.before_image) + list(ex.prompt.after_image)
        for response in ex.responses:
            text_ids += response[:-1]
    text_embeds = embed_tokens(torch.tensor(text_ids, dtype=torch.long, device=device)).to(device)
    dtype = with_image[0].visual_tokens.dtype if with_image else text_embeds.dtype
    text_embeds = text_embeds.to(dtype)
    hidden = text_embeds.shape[-1]
    no_visual_tokens = text_embeds.new_zeros(0, hidden)

    rows, positions, segments, attendable = [], [], [], []
    score_rows, score_labels, score_slots, score_flags = [], [], [], []
    valid = torch.zeros(max(rows_out) + 1, slots, dtype=torch.bool)
    cursor = 0
    for b, ex in enumerate(examples):
        n_before, n_after, n_visual = len(ex.prompt.before_image), len(ex.prompt.after_image), ex.num_visual_tokens
        visual = no_visual_tokens if ex.visual_tokens is None else ex.visual_tokens.to(device, dtype)
        pieces = [text_embeds[cursor:cursor + n_before], visual,
                  text_embeds[cursor + n_before:cursor + n_before + n_after]]
        cursor += n_before + n_after
        prefix = ex.prefix_length
        row_segments = [PREFIX_SEGMENT] * prefix
        prefix_pos, answer_start = prefix_positions(n_before, n_visual, n_after, ex.visual_layout)
        row_positions = [prefix_pos]
        visual_ok = (torch.ones(n_visual, dtype=torch.bool) if ex.visual_attendable is None
                     else ex.visual_attendable.to("cpu", torch.bool))
        row_attendable = [True] * n_before + visual_ok.tolist() + [True] * n_after
        offset = prefix
        for j, response in enumerate(ex.responses):
            fed = len(response) - 1
            pieces.append(text_embeds[cursor:cursor + fed])
            cursor += fed
            # Hidden state predicting token i of the response: the prefix's last token for i = 0, else token i-1.
            predicting = [prefix - 1] + list(range(offset, offset + fed))
            score_rows += [b * length + p for p in predicting]
            score_labels += list(response)
            score_flags += ex.token_flags[j] if ex.token_flags is not None else [False] * len(response)
            out_row, out_slot = rows_out[b], slots_out[b][j]
            if valid[out_row, out_slot]:
                raise ValueError(f"two responses map to output row {out_row}, slot {out_slot}")
            score_slots += [out_row * slots + out_slot] * len(response)
            row_segments += [j + 1] * fed
            row_positions.append(text_positions(answer_start, fed, mrope))
            row_attendable += [True] * fed
            offset += fed
            valid[out_row, out_slot] = True
        pad = length - offset
        if pad:
            pieces.append(torch.zeros(pad, hidden, dtype=dtype, device=device))
        rows.append(torch.cat(pieces))
        segments.append(row_segments + [PAD_SEGMENT] * pad)
        positions.append(torch.cat(row_positions + [text_positions(0, pad, mrope) * 0], dim=-1))
        attendable.append(row_attendable + [False] * pad)

    segment_ids = torch.tensor(segments, dtype=torch.long, device=device)
    attendable_t = torch.tensor(attendable, dtype=torch.bool, device=device)
    return PackedBatch(
        inputs_embeds=torch.stack(rows),
        attention_mask=listwise_attention_mask(segment_ids, attendable_t),
        position_ids=torch.stack(positions, dim=-2).to(device),
        score_rows=torch.tensor(score_rows, dtype=torch.long, device=device),
        score_labels=torch.tensor(score_labels, dtype=torch.long, device=device),
        score_slots=torch.tensor(score_slots, dtype=torch.long, device=device),
        valid=valid.to(device),
        num_real_tokens=sum(ex.packed_length for ex in examples),
        score_flags=(torch.tensor(score_flags, dtype=torch.bool, device=device)
                     if any(ex.token_flags is not None for ex in examples) else None),
        segment_ids=segment_ids,
        attendable=attendable_t,
    )


def listwise_attention_mask(segment_ids: torch.Tensor, attendable: torch.Tensor) -> torch.Tensor:
    """bool [B, 1, L, L]: key k is visible to query q iff k ≤ q, k is attendable, and k is in the prefix or in q's
    own response. Padding queries see only themselves, so no softmax row is empty."""
    length = segment_ids.shape[1]
    index = torch.arange(length, device=segment_ids.device)
    causal = index[None, :] <= index[:, None]  # [q, k]
    seg_q, seg_k = segment_ids[:, :, None], segment_ids[:, None, :]
    is_pad_query = seg_q == PAD_SEGMENT
    same_view = ((seg_k == PREFIX_SEGMENT) | (seg_k == seg_q)) & ~is_pad_query
    mask = causal[None] & same_view & attendable[:, None, :]
    pad_self = is_pad_query & torch.eye(length, dtype=torch.bool, device=segment_ids.device)[None]
    return (mask | pad_self)[:, None]


def answer_hidden_states(model, batch: PackedBatch) -> torch.Tensor:
    """[M, D] final hidden states that predict each answer token of the batch (in `score_rows` order). `model` has
    `decoder_hidden_states` (our wrappers) or is a stock transformers causal language model."""
    from hscr_fast.listwise_attention import attention_mask_for
    from hscr_fast.models.causal_lm import as_listwise_model

    model = as_listwise_model(model)
    hidden = model.decoder_hidden_states(batch.inputs_embeds, attention_mask_for(model, batch), batch.position_ids)
    return select_answer_states(hidden, batch)


def select_answer_states(hidden: torch.Tensor, batch: PackedBatch) -> torch.Tensor:
    """The [M, D] rows of the decoder's output [B, L, D] that predict the batch's answer tokens."""
    if hidden.shape[:2] != batch.inputs_embeds.shape[:2]:
        raise ValueError(f"hidden states of shape {tuple(hidden.shape)} do not match the packed batch "
                         f"{tuple(batch.inputs_embeds.shape[:2])} (rows, tokens)")
    return hidden.reshape(-1, hidden.shape[-1]).index_select(0, batch.score_rows)


def sum_by_slot(token_values: torch.Tensor, batch: PackedBatch) -> torch.Tensor:
    """Per-token values [M] → per-response sums [rows, S] (0 at invalid slots)."""
    out = torch.zeros(batch.valid.numel(), dtype=token_values.dtype, device=token_values.device)
    out = out.index_add(0, batch.score_slots, token_values)
    return out.view(batch.valid.shape)


def response_logprobs(hidden: torch.Tensor, head_weight: torch.Tensor, batch: PackedBatch) -> torch.Tensor:
    """Sequence log-probs [rows, S] (float32, 0 at invalid slots) from a decoder's final hidden states [B, L, D] over
    the packed batch and its output head's weight [V, D]: for models this library does not wrap. Differentiable in
    both; the [tokens, V] logits are never stored."""
    from hscr_fast.kernels import fused_linear_logprobs

    token_logps = fused_linear_logprobs(select_answer_states(hidden, batch), head_weight, batch.score_labels)
    return sum_by_slot(token_logps, batch)


def listwise_logprobs(model, batch: PackedBatch) -> torch.Tensor:
    """Sequence log-probs [rows, S] (sum over answer tokens, float32) of every response, differentiable. `model` as
    in `answer_hidden_states`."""
    from hscr_fast.kernels import fused_linear_logprobs
    from hscr_fast.models.causal_lm import as_listwise_model

    model = as_listwise_model(model)
    hidden = answer_hidden_states(model, batch)
    token_logps = fused_linear_logprobs(hidden, model.lm_head_weight, batch.score_labels)
    return sum_by_slot(token_logps, batch)


def _module_device(embed_tokens) -> torch.device:
    """Where a text-only batch goes when no device is given: the embedding module's, or the model's whose method
    `embed_tokens` is (CPU for any other function)."""
    if isinstance(embed_tokens, torch.nn.Module):
        parameter = next(embed_tokens.parameters(), None)
        if parameter is not None:
            return parameter.device
    owner_device = getattr(getattr(embed_tokens, "__self__", None), "device", None)
    return owner_device if isinstance(owner_device, torch.device) else torch.device("cpu")
