"""fused_linear_logprobs' row kernel: per row of a chunk of fp32 logits, one program streams V in BLOCK_V tiles.

  pass 1 (forward): online logsumexp + the label logit: reads 4·V bytes, writes 8 bytes;
  pass 2 (gradient wanted): scale·(e_y − p) from the logits and lse: reads 4·V bytes, writes V·itemsize bytes
  (in place over the logits when the weight is fp32).
"""
import torch
import triton
import triton.language as tl

from ._rows import grad_buffer, gradient_row

_MAX_BLOCK_V = 4096


@triton.jit
def logprob_rows_kernel(
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
        scale, grad_row = gradient_row(scale_ptr, grad_ptr, grad_row_stride, row, HAS_SCALE)
        for start in range(0, n_cols, BLOCK_V):
            cols = start + tl.arange(0, BLOCK_V)
            in_row = cols < n_cols
            p = tl.exp(tl.load(logits_row + cols, mask=in_row, other=0.0).to(tl.float32) - lse)
            grad = tl.where(cols == label, 1.0 - p, -p) * scale
            grad = tl.where(valid, grad, 0.0)
            tl.store(grad_row + cols, grad.to(grad_ptr.dtype.element_ty), mask=in_row)


def logprob_rows(logits, labels, *, setting, stats=None, grad_scale=None, grad_dtype=None):
    """The Triton form of fused_linear_logprobs' row work, `_logprob_rows_torch` there (same arguments and results)."""
    ignore_index, lse = setting, stats
    rows, vocab = logits.shape
    logp = logits.new_empty(rows, dtype=torch.float32)
    lse_buffer = lse if lse is not None else logits.new_empty(rows, dtype=torch.float32)
    grad = grad_buffer(logits, grad_dtype)
    block = min(_MAX_BLOCK_V, triton.next_power_of_2(vocab))
    logprob_rows_kernel[(rows,)](
        logits, logits.stride(0), labels, lse_buffer, grad_scale if grad_scale is not None else logp, logp,
        grad, grad.stride(0), vocab, ignore_index,
        HAS_LSE=lse is not None, WRITE_GRAD=grad_dtype is not None, HAS_SCALE=grad_scale is not None,
        BLOCK_V=block, num_warps=8 if block >= 2048 else 4,
    )
    return (logp if lse is None else None), lse_buffer, (grad if grad_dtype is not None else None)
