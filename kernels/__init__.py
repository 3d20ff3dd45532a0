"""Triton kernels and their chunked PyTorch forms, installed as `hscr_fast.kernels`.

- `fused_linear_logprobs`: per-token log-probabilities from hidden states and the lm_head, no [N, V] logits.
- `contrastive_select` / `contrastive_select_from_hidden`: HSCR stage-1 sensitivity, positions and replacements.

Importing this package does not import triton: each op imports it on its first Triton-path call.
"""
from .contrastive_select import ContrastiveSelection, contrastive_select, contrastive_select_from_hidden
from .fused_linear_logprobs import fused_linear_logprobs
from .fused_token_kl import fused_token_kl

__all__ = ["ContrastiveSelection", "contrastive_select", "contrastive_select_from_hidden", "fused_linear_logprobs",
           "fused_token_kl"]
