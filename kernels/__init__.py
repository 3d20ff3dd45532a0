"""Triton kernels and their chunked PyTorch forms, installed as `hscr_fast.kernels`.

- `fused_linear_logprobs`: per-token log-probabilities from hidden states and the lm_head, no [N, V] logits.
- `fused_token_kl`: per-token KL between the policy's and the reference's next-token distributions, no [N, V] logits.
- `contrastive_select` / `contrastive_select_from_hidden`: HSCR stage-1 sensitivity, positions and replacements.

Each op module holds its torch form, its autograd Function (the differentiable ones share `_chunked_rows`) and its
public function; the Triton kernels live in `_triton/`, which only a Triton-path call imports, so importing this
package does not import triton.
"""
from .contrastive_select import ContrastiveSelection, contrastive_select, contrastive_select_from_hidden
from .fused_linear_logprobs import fused_linear_logprobs
from .fused_token_kl import fused_token_kl

__all__ = ["ContrastiveSelection", "contrastive_select", "contrastive_select_from_hidden", "fused_linear_logprobs",
           "fused_token_kl"]
