"""Fused linear + log-softmax + gather: per-token log-probabilities from hidden states and the lm_head weight.

Math, for row n with hidden state h_n [D], lm_head weight W [V, D] (no bias) and label y_n:

    z_nv  = h_n · w_v                      lse_n = log Σ_v exp(z_nv)          p_n = softmax(z_n)
    out_n = z_{n,y_n} − lse_n              (0 where y_n == ignore_index)
    ∂out_n/∂h_n = w_{y_n} − Σ_v p_nv w_v = (e_{y_n} − p_n) W          ∂out_n/∂W = (e_{y_n} − p_n)ᵀ h_n

Memory. Rows go through in chunks of C rows; the chunk's fp32 logits [C, V] (plus, for bf16/fp16 weights, the
gradient factor [C, V] in the weight dtype that feeds the next GEMM) are the only vocabulary-sized buffers alive. The
[N, V] logits are never stored, in forward or backward. C defaults to the rows that fit in 1/8 of what the
materialised logits would take (at least 32 MiB).

Gradient strategy (`_chunked_rows` says why each): weight frozen, hidden needs grad (LoRA) -> precompute the
direction (e_{y_n} − p_n) W in forward, 2 GEMMs in all, as many as autograd through materialised logits; weight needs
grad -> keep lse [N] and recompute, 4 GEMMs against autograd's 3 (one extra GEMM buys O(C·V) memory instead of
O(N·V)); nothing needs grad -> 1 GEMM.

The GEMMs go to cuBLAS (or the CPU BLAS) through torch.mm with fp32 output; they are nearly all of the FLOPs. The row
work between them, over V: on CUDA the Triton kernel in `_triton/logprob_rows.py` (one program per row), otherwise
the same chunks with torch.logsumexp and an in-place exp on the chunk buffer.
"""
from __future__ import annotations

import torch

from ._chunked_rows import ChunkedLinearRowsFunction
from ._common import (
    check_chunk_rows,
    check_head_inputs,
    check_labels,
    default_chunk_rows,
    resolve_backend,
)


def _logprob_rows_torch(logits, labels, *, setting, stats=None, grad_scale=None, grad_dtype=None):
    """Row work on one chunk of fp32 logits [C, V] (consumed: it may be overwritten); `setting` is ignore_index and
    the statistics are lse [C].

    Without `stats`: returns (log p(label), lse, grad factor or None). With `stats` (backward): skips the reduction
    and returns (None, lse, grad factor). The grad factor, in `grad_dtype`, is scale·(e_label − p) per row, scale being
    `grad_scale` (the upstream gradient) or 1, and 0 on ignored rows.
    """
    lse, valid = stats, labels != setting
    safe_labels = torch.where(valid, labels, 0)[:, None]
    logp = None
    if lse is None:
        lse = torch.logsumexp(logits, dim=1)
        logp = torch.where(valid, logits.gather(1, safe_labels).squeeze(1) - lse, 0.0).float()
    if grad_dtype is None:
        return logp, lse, None
    scale = valid.to(logits.dtype) if grad_scale is None else torch.where(valid, grad_scale.to(logits.dtype), 0.0)
    grad = logits.sub_(lse[:, None]).exp_().mul_(-scale[:, None])
    grad.scatter_add_(1, safe_labels, scale[:, None])
    return logp, lse, grad.to(grad_dtype)


class FusedLinearLogprobsFunction(ChunkedLinearRowsFunction):
    """Rows: hidden (through the head), labels; setting: ignore_index; statistics: lse [N]."""

    torch_rows = staticmethod(_logprob_rows_torch)

    @staticmethod
    def triton_rows():
        from ._triton.logprob_rows import logprob_rows

        return logprob_rows


def fused_linear_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    ignore_index: int = -100,
    chunk_size: int | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """log p(labels[n] | hidden[n]) under the linear head `weight` (no bias), as float32 [N]; 0 at ignored rows.

    hidden [N, D] and weight [V, D] share one floating dtype (bf16/fp16/fp32 accumulate in fp32; fp64 stays fp64 in
    the torch form); labels [N] are token ids in [0, V) or `ignore_index`. Differentiable in `hidden`, and in `weight`
    when it requires grad (see the module docstring for which strategy each case uses). `chunk_size` is the number of
    rows whose logits exist at once (default: 1/8 of the full logits' memory, at least 32 MiB). `backend`: "auto"
    (Triton on CUDA, torch otherwise), "triton" or "torch".
    """
    op = "fused_linear_logprobs"
    check_head_inputs(op, {"hidden": hidden}, weight, on_same_device={"labels": labels})
    check_chunk_rows(chunk_size, op)
    check_labels(labels, hidden.shape[0], weight.shape[0], ignore_index, op=op)
    backend = resolve_backend(backend, hidden.device)
    chunk_rows = chunk_size or default_chunk_rows(hidden.shape[0], weight.shape[0], hidden.dtype, logit_blocks=1)
    return FusedLinearLogprobsFunction.apply(hidden, labels.long().contiguous(), weight, ignore_index, chunk_rows,
                                             backend)
