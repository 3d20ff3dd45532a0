"""Fused linear + log-softmax + gather: per-token log-probabilities from hidden states and the lm_head weight.

Math, for row n with hidden state h_n [D], lm_head weight W [V, D] (no bias) and label y_n:

    z_nv  = h_n · w_v                      lse_n = log Σ_v exp(z_nv)          p_n = softmax(z_n)
    out_n = z_{n,y_n} − lse_n              (0 where y_n == ignore_index)
    ∂out_n/∂h_n = w_{y_n} − Σ_v p_nv w_v = (e_{y_n} − p_n) W          ∂out_n/∂W = (e_{y_n} − p_n)ᵀ h_n

Memory. Rows go through in chunks of C rows; the chunk's fp32 logits [C, V] (plus, for bf16/fp16 weights, the
gradient factor [C, V] in the weight dtype that feeds the next GEMM) are the only vocabulary-sized buffers alive. The
[N, V] logits are never stored, in forward or backward. C defaults to the rows that fit in 1/8 of what the
materialised logits would take (at least 32 MiB).

Gradient strategy, chosen in forward from which inputs need a gradient:
  * weight frozen, hidden needs grad (LoRA) -> precompute. out_n is a per-row scalar, so the upstream gradient only
    rescales row n: grad_h_n = g_n · (e_{y_n} − p_n) W, and the direction (e_{y_n} − p_n) W does not depend on g.
    Forward forms it while p is at hand (a second GEMM per chunk) and keeps it, [N, D] in the hidden dtype, cheaper
    than any vocabulary-sized tensor; backward is one multiply. 2 GEMMs in all, as many as autograd through
    materialised logits, and no recompute.
  * weight needs grad -> recompute. grad_W = Σ_n g_n (e_{y_n} − p_n)ᵀ h_n weighs every row by its upstream gradient
    before summing over rows, so it cannot be formed before g is known without keeping p [N, V]. Forward keeps lse [N]
    only; backward recomputes each chunk's logits, turns them into g_n (e_{y_n} − p_n) in one pass (lse is known) and
    runs the two gradient GEMMs. 4 GEMMs against autograd's 3: one extra GEMM buys O(C·V) memory instead of O(N·V).
  * nothing needs grad -> forward only, 1 GEMM.

Triton form (CUDA): the GEMMs go to cuBLAS through torch.mm with fp32 output; they are nearly all of the FLOPs and
cuBLAS runs them near peak. `_logprob_rows_kernel` does the vocabulary-wide row work, one program per row:
  pass 1 (forward): online logsumexp over V in BLOCK_V tiles + the label logit: reads 4·V bytes, writes 8 bytes;
  pass 2 (gradient wanted): scale·(e_y − p) from the logits and lse: reads 4·V bytes, writes V·itemsize bytes
  (in place over the logits when the weight is fp32).
Torch form (CPU, or no triton): the same chunks with torch.logsumexp and in-place exp on the chunk buffer.
"""
from __future__ import annotations

import functools

import torch
from torch.autograd.function import once_differentiable

from ._common import (
    check_labels,
    compute_dtype,
    default_chunk_rows,
    linear_logits_fp32,
    recompute_linear_grads,
    rescale_direction,
    resolve_backend,
)

_MAX_BLOCK_V = 4096

# triton.language and the kernel, bound by _triton_kernels() on first use (see there).
tl = None
_logprob_rows_kernel = None


@functools.cache
def _triton_kernels():
    """Import triton and define the kernel on the first Triton-path call, not at module import.

    `import hscr_fast.kernels` must work where triton is not installed (macOS), and Triton decides between compiling
    and interpreting (TRITON_INTERPRET) when a kernel is decorated, so tests can still set it at their import time.
    The names are module globals (`global`) because Triton resolves a kernel's names through its module's globals.
    """
    global tl, _logprob_rows_kernel
    import triton
    import triton.language as tl

    @triton.jit
    def _logprob_rows_kernel(
        logits_ptr, logits_row_stride, labels_ptr, lse_ptr, scale_ptr, logp_ptr, grad_ptr, grad_row_stride,
        n_cols, ignore_index,
        HAS_LSE: tl.constexpr, WRITE_GRAD: tl.constexpr, HAS_SCALE: tl.constexpr, BLOCK_V: tl.constexpr,
    ):
        # int64 row offsets: rows * V exceeds 2**31 at a few tens of thousands of rows.
        row = tl.program_id(0).to(tl.int64)
        logits_row = logits_ptr + row * logits_row_stride
        label = tl.load(labels_ptr + row)
        valid = label != ignore_index
        if HAS_LSE:
            lse = tl.load(lse_ptr + row)
        else:
            running_max = float("-inf")
            running_sum = 0.0
            for start in range(0, n_cols, BLOCK_V):
                cols = start + tl.arange(0, BLOCK_V)
                x = tl.load(logits_row + cols, mask=cols < n_cols, other=float("-inf")).to(tl.float32)
                new_max = tl.maximum(running_max, tl.max(x, 0))
                # a row that is -inf so far must not turn into nan through (-inf) - (-inf)
                shift = tl.where(new_max == float("-inf"), 0.0, new_max)
                running_sum = running_sum * tl.exp(running_max - shift) + tl.sum(tl.exp(x - shift), 0)
                running_max = new_max
            lse = running_max + tl.log(running_sum)
            label_logit = tl.load(logits_row + label, mask=valid, other=0.0).to(tl.float32)
            tl.store(logp_ptr + row, tl.where(valid, label_logit - lse, 0.0))
            tl.store(lse_ptr + row, lse)
        if WRITE_GRAD:
            if HAS_SCALE:
                scale = tl.load(scale_ptr + row).to(tl.float32)
            else:
                scale = 1.0
            grad_row = grad_ptr + row * grad_row_stride
            for start in range(0, n_cols, BLOCK_V):
                cols = start + tl.arange(0, BLOCK_V)
                in_row = cols < n_cols
                p = tl.exp(tl.load(logits_row + cols, mask=in_row, other=0.0).to(tl.float32) - lse)
                grad = tl.where(cols == label, 1.0 - p, -p) * scale
                grad = tl.where(valid, grad, 0.0)
                tl.store(grad_row + cols, grad.to(grad_ptr.dtype.element_ty), mask=in_row)

    return _logprob_rows_kernel


def _logprob_rows_triton(logits, labels, ignore_index, *, lse=None, grad_scale=None, grad_dtype=None):
    """Triton form of `_logprob_rows_torch` (same arguments and results)."""
    import triton

    kernel = _triton_kernels()
    rows, vocab = logits.shape
    logp = logits.new_empty(rows, dtype=torch.float32)
    lse_buffer = lse if lse is not None else logits.new_empty(rows, dtype=torch.float32)
    if grad_dtype is None or grad_dtype == logits.dtype:
        grad = logits  # written in place (or not at all): the chunk's logits are not needed afterwards
    else:
        grad = logits.new_empty(rows, vocab, dtype=grad_dtype)
    block = min(_MAX_BLOCK_V, triton.next_power_of_2(vocab))
    kernel[(rows,)](
        logits, logits.stride(0), labels, lse_buffer, grad_scale if grad_scale is not None else logp, logp,
        grad, grad.stride(0), vocab, ignore_index,
        HAS_LSE=lse is not None, WRITE_GRAD=grad_dtype is not None, HAS_SCALE=grad_scale is not None,
        BLOCK_V=block, num_warps=8 if block >= 2048 else 4,
    )
    return (logp if lse is None else None), lse_buffer, (grad if grad_dtype is not None else None)


def _logprob_rows_torch(logits, labels, ignore_index, *, lse=None, grad_scale=None, grad_dtype=None):
    """Row work on one chunk of fp32 logits [C, V] (consumed: it may be overwritten).

    Without `lse`: returns (log p(label), lse, grad factor or None). With `lse` (backward): skips the reduction and
    returns (None, lse, grad factor). The grad factor, in `grad_dtype`, is scale·(e_label − p) per row, scale being
    `grad_scale` (the upstream gradient) or 1, and 0 on ignored rows.
    """
    valid = labels != ignore_index
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


def _logprob_rows(backend, *args, **kwargs):
    return (_logprob_rows_triton if backend == "triton" else _logprob_rows_torch)(*args, **kwargs)


class _FusedLinearLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, labels, ignore_index, chunk_rows, backend):
        hidden_needs_grad, weight_needs_grad = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        precompute = hidden_needs_grad and not weight_needs_grad
        rows = hidden.shape[0]
        logp = hidden.new_empty(rows, dtype=torch.float32)
        lse = hidden.new_empty(rows, dtype=torch.float32 if backend == "triton" else compute_dtype(hidden.dtype))
        direction = torch.empty_like(hidden, memory_format=torch.contiguous_format) if precompute else None
        for start in range(0, rows, chunk_rows):
            chunk = slice(start, start + chunk_rows)
            logits = linear_logits_fp32(hidden[chunk], weight)
            logp[chunk], lse[chunk], grad_factor = _logprob_rows(
                backend, logits, labels[chunk], ignore_index, grad_dtype=weight.dtype if precompute else None
            )
            if precompute:
                torch.mm(grad_factor, weight, out=direction[chunk])
        ctx.strategy = "precompute" if precompute else ("recompute" if weight_needs_grad else "none")
        ctx.ignore_index, ctx.chunk_rows, ctx.backend = ignore_index, chunk_rows, backend
        if precompute:
            ctx.save_for_backward(direction)
        elif weight_needs_grad:
            ctx.save_for_backward(hidden, weight, labels, lse)
        return logp

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_logp):
        if ctx.strategy == "precompute":
            (direction,) = ctx.saved_tensors
            return rescale_direction(direction, grad_logp), None, None, None, None, None
        hidden, weight, labels, lse = ctx.saved_tensors
        grad_logp = grad_logp.float().contiguous()

        def grad_factor_of(chunk):
            return _logprob_rows(ctx.backend, linear_logits_fp32(hidden[chunk], weight), labels[chunk],
                                 ctx.ignore_index, lse=lse[chunk], grad_scale=grad_logp[chunk],
                                 grad_dtype=weight.dtype)[2]

        grad_hidden, grad_weight = recompute_linear_grads(hidden, weight, ctx.chunk_rows, ctx.needs_input_grad[0],
                                                          grad_factor_of)
        return grad_hidden, grad_weight, None, None, None, None


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
    if hidden.dim() != 2 or weight.dim() != 2:
        raise ValueError(f"{op}: hidden must be [N, D] and weight [V, D], got {list(hidden.shape)} and "
                         f"{list(weight.shape)}")
    if hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"{op}: hidden has D={hidden.shape[1]} but weight has D={weight.shape[1]} (weight is [V, D])")
    if not hidden.is_floating_point() or hidden.dtype != weight.dtype:
        raise TypeError(f"{op}: hidden and weight must share one floating dtype, got {hidden.dtype} and {weight.dtype}")
    if hidden.device != weight.device or labels.device != hidden.device:
        raise ValueError(f"{op}: hidden, weight and labels must be on one device, got "
                         f"{hidden.device}, {weight.device}, {labels.device}")
    if weight.shape[0] == 0:
        raise ValueError(f"{op}: weight has an empty vocabulary")
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"{op}: chunk_size must be a positive number of rows, got {chunk_size}")
    check_labels(labels, hidden.shape[0], weight.shape[0], ignore_index, op=op)
    backend = resolve_backend(backend, hidden.device)
    chunk_rows = chunk_size or default_chunk_rows(hidden.shape[0], weight.shape[0], hidden.dtype, logit_blocks=1)
    return _FusedLinearLogprobs.apply(hidden, weight, labels.long().contiguous(), ignore_index, chunk_rows, backend)
