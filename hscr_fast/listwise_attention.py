"""The listwise visibility as a FlexAttention `BlockMask`, for decoders that run transformers' "flex_attention".

The dense form (`listwise.listwise_attention_mask`, a bool [B, 1, L, L] tensor) makes SDPA compute every block of
the score matrix, the masked ones included: the upper causal half, and every response-to-response block. FlexAttention
skips whole blocks that are masked and applies the mask function only to blocks that are partly visible, so the cost
follows the visible area: prefix² / 2 + Σ (prefix · answer) instead of L².

The same visibility, key k visible to query q iff
- k ≤ q, k is attendable (not masked out by visual-token dropout), and k is in the prefix or in q's own response;
- a padding query sees only itself (so no softmax row is empty; its output is never read).

The mask is built once per batch and handed to the language model as its `attention_mask`: transformers passes a
4D mask through unchanged, so every layer (and every recomputation under gradient checkpointing) reads the same one.

Which form is used follows the decoder's attention implementation: a model loaded (or switched) with
`attn_implementation="flex_attention"` gets the BlockMask, any other the dense mask (`attention_mask_for`). Flex
attention is compiled on CUDA; torch has no CPU backward for it, so on CPU the dense path is the one to train with.
transformers 5.24 offers flex attention for the LLaVA and LLaVA-NeXT decoders (Mistral, Llama) but not for
Qwen2-VL's, which keeps the dense path.
"""
from __future__ import annotations

import torch

from hscr_fast.runtime.errors import HscrError

FLEX_ATTENTION = "flex_attention"


class AttentionChoiceError(HscrError):
    """An attention implementation this decoder or device cannot train with."""


def uses_flex_attention(model) -> bool:
    """Whether the language model's layers run transformers' flex attention (and so need a BlockMask). `model`: a
    VisionLanguageModel or CausalLanguageModel."""
    return model.config.get_text_config()._attn_implementation == FLEX_ATTENTION


def decoder_of(model):
    """The transformers module whose attention implementation matters (the language model of a VLM)."""
    return model.language_model if hasattr(model, "language_model") else model.base_model.get_decoder()


def flex_attention_supported(model) -> bool:
    """Whether transformers lets this decoder run flex attention (Qwen2-VL's text model does not, as of 5.24)."""
    return bool(getattr(decoder_of(model), "_supports_flex_attn", False))


def flex_attention_preferred(model, device: torch.device) -> bool:
    """FlexAttention is worth choosing where it compiles to a fused kernel with a backward (CUDA) and the decoder
    supports it; elsewhere the dense mask with SDPA is used."""
    if torch.device(device).type != "cuda" or not flex_attention_supported(model):
        return False
    try:
        from torch.nn.attention.flex_attention import flex_attention  # noqa: F401
    except ImportError:
        return False
    return True


def listwise_block_mask(segment_ids: torch.Tensor, attendable: torch.Tensor, *, block_size: int = 128):
    """BlockMask [B, 1 (broadcast over heads), L, L] of the listwise visibility.

    `segment_ids` [B, L]: -1 padding, 0 prefix, j+1 response j (as `PackedBatch.segment_ids`); `attendable` [B, L]
    bool: False for keys nobody may see. Sequences shorter than `block_size` are padded to a block by torch."""
    from torch.nn.attention.flex_attention import create_block_mask

    from hscr_fast.listwise import PAD_SEGMENT, PREFIX_SEGMENT

    batch, length = segment_ids.shape

    def visible(b, h, q, k):
        segment_q, segment_k = segment_ids[b, q], segment_ids[b, k]
        same_view = (segment_k == PREFIX_SEGMENT) | (segment_k == segment_q)
        real_query = segment_q != PAD_SEGMENT
        return ((k <= q) & same_view & attendable[b, k] & real_query) | (~real_query & (q == k))

    return create_block_mask(visible, batch, None, length, length, device=segment_ids.device, BLOCK_SIZE=block_size)


def attention_mask_for(model, batch):
    """The mask to give the decoder for a packed batch: a BlockMask under flex attention, else the dense bool mask.
    The BlockMask is made on first use and kept on the batch (the reference pass and the policy pass share it)."""
    if not uses_flex_attention(model):
        return batch.attention_mask
    if batch.block_mask is None:
        batch.block_mask = listwise_block_mask(batch.segment_ids, batch.attendable)
    return batch.block_mask


ATTENTION_CHOICES = ("auto", "sdpa", "flex_attention", "eager")


def loading_attention(choice: str) -> str:
    """The implementation to load the model with for `choice`: flex attention is switched on afterwards, for the
    decoder only (`apply_attention_choice`), so the vision tower keeps SDPA."""
    return "sdpa" if choice in ("auto", FLEX_ATTENTION) else choice


def apply_attention_choice(model, choice: str, device) -> str:
    """Puts the decoder on flex attention for `choice` "flex_attention", and for "auto" on CUDA where transformers
    offers it for this decoder; any other choice was applied at loading. Returns the decoder's implementation."""
    if choice not in ATTENTION_CHOICES:
        raise AttentionChoiceError(f"attention implementation {choice!r}: choose one of "
                                   f"{', '.join(ATTENTION_CHOICES)}")
    if choice == FLEX_ATTENTION:
        if torch.device(device).type == "cpu":
            raise AttentionChoiceError("flex_attention has no backward on CPU in torch; train on CPU with sdpa "
                                       "(or auto)")
        if not flex_attention_supported(model):
            raise AttentionChoiceError(f"transformers offers no flex attention for the {model.family} decoder; use "
                                       "sdpa (or auto)")
    if choice == FLEX_ATTENTION or (choice == "auto" and flex_attention_preferred(model, device)):
        decoder_of(model).set_attn_implementation(FLEX_ATTENTION)
    return model.config.get_text_config()._attn_implementation
