"""fused_token_kl's row kernel: per row of the policy's and the reference's fp32 logit chunks, one program streams V in
BLOCK_V tiles, with int64 row offsets.

  pass 1 (forward): online maxima and sums of both rows: reads 2·4·V bytes, writes 16 bytes (value + statistics);
  pass 2 (gradient wanted): g_n·G_n from both rows and the statistics: reads 2·4·V bytes, writes V·itemsize bytes
  (in place over the policy logits when the weight is fp32).
"""
import torch
import triton
import triton.language as tl

from ._rows import grad_buffer, gradient_row

_MAX_BLOCK_V = 4096


@triton.jit
def _online_sums(running_max, running_sum, running_gap_sum, x, gap):
    """One tile's update of the running max m, Σ exp(x − m) and Σ exp(x − m)·gap: both sums are rescaled by
    exp(m_old − m_new) when the max grows."""
    new_max = tl.maximum(running_max, tl.max(x, 0))
    rescale = tl.exp(running_max - new_max)
    weights = tl.exp(x - new_max)
    return new_max, running_sum * rescale + tl.sum(weights, 0), running_gap_sum * rescale + tl.sum(weights * gap, 0)


@triton.jit
def token_kl_rows_kernel(
    policy_ptr, policy_row_stride, reference_ptr, reference_row_stride, stats_ptr, stats_stride,
    kl_ptr, scale_ptr, grad_ptr, grad_row_stride, n_cols, lam,
    HAS_STATS: tl.constexpr, WRITE_GRAD: tl.constexpr, HAS_SCALE: tl.constexpr, BLOCK_V: tl.constexpr,
):
    # int64 row offsets: rows * V exceeds 2**31 at a few tens of thousands of rows.
    row = tl.program_id(0).to(tl.int64)
    policy_row = policy_ptr + row * policy_row_stride
    reference_row = reference_ptr + row * reference_row_stride
    if HAS_STATS:
        lse_policy = tl.load(stats_ptr + row)
        lse_reference = tl.load(stats_ptr + stats_stride + row)
        mean_gap = tl.load(stats_ptr + 2 * stats_stride + row)
    else:
        # Logits come from a linear layer, so they are finite, and the first tile is never empty: the running
        # maxima are finite from the first tile on and exp(m_old − m_new) is exp(−inf) = 0 exactly once.
        max_policy = float("-inf")
        sum_policy = 0.0
        gap_sum_policy = 0.0  # Σ exp(a − max_policy)·(a − b)
        max_reference = float("-inf")
        sum_reference = 0.0
        gap_sum_reference = 0.0  # Σ exp(b − max_reference)·(a − b)
        for start in range(0, n_cols, BLOCK_V):
            cols = start + tl.arange(0, BLOCK_V)
            in_row = cols < n_cols
            a = tl.load(policy_row + cols, mask=in_row, other=0.0).to(tl.float32)
            b = tl.load(reference_row + cols, mask=in_row, other=0.0).to(tl.float32)
            gap = a - b  # 0 in the padding
            # -inf padding for the max and the exp weights (exp(-inf) = 0), kept out of `gap`: no nan
            a = tl.where(in_row, a, float("-inf"))
            b = tl.where(in_row, b, float("-inf"))

            max_policy, sum_policy, gap_sum_policy = _online_sums(max_policy, sum_policy, gap_sum_policy, a, gap)
            max_reference, sum_reference, gap_sum_reference = _online_sums(max_reference, sum_reference,
                                                                           gap_sum_reference, b, gap)
        lse_policy = max_policy + tl.log(sum_policy)
        lse_reference = max_reference + tl.log(sum_reference)
        mean_gap = gap_sum_policy / sum_policy  # E_π[a − b]
        mean_gap_reference = gap_sum_reference / sum_reference  # E_ρ[a − b]
        log_ratio = (max_policy - max_reference) + tl.log(sum_policy / sum_reference)  # Δ, see the docstring
        kl = (1.0 - lam) * mean_gap - lam * mean_gap_reference + (2.0 * lam - 1.0) * log_ratio
        tl.store(kl_ptr + row, tl.maximum(kl, 0.0))
        tl.store(stats_ptr + row, lse_policy)
        tl.store(stats_ptr + stats_stride + row, lse_reference)
        tl.store(stats_ptr + 2 * stats_stride + row, mean_gap)
    if WRITE_GRAD:
        scale, grad_row = gradient_row(scale_ptr, grad_ptr, grad_row_stride, row, HAS_SCALE)
        for start in range(0, n_cols, BLOCK_V):
            cols = start + tl.arange(0, BLOCK_V)
            in_row = cols < n_cols
            a = tl.load(policy_row + cols, mask=in_row, other=0.0).to(tl.float32)
            b = tl.load(reference_row + cols, mask=in_row, other=0.0).to(tl.float32)
            policy_prob = tl.exp(a - lse_policy)
            reference_prob = tl.exp(b - lse_reference)
            grad = lam * (policy_prob - reference_prob) + (1.0 - lam) * policy_prob * ((a - b) - mean_gap)
            tl.store(grad_row + cols, (grad * scale).to(grad_ptr.dtype.element_ty), mask=in_row)


def token_kl_rows(policy_logits, reference_logits, *, setting, stats=None, grad_scale=None, grad_dtype=None):
    """The Triton form of fused_token_kl's row work, `_token_kl_rows_torch` there (same arguments and results)."""
    lam = setting
    rows, vocab = policy_logits.shape
    kl = policy_logits.new_empty(rows, dtype=torch.float32)
    stats_buffer = stats if stats is not None else policy_logits.new_empty(3, rows, dtype=torch.float32)
    grad = grad_buffer(policy_logits, grad_dtype)
    block = min(_MAX_BLOCK_V, triton.next_power_of_2(vocab))
    token_kl_rows_kernel[(rows,)](
        policy_logits, policy_logits.stride(0), reference_logits, reference_logits.stride(0),
        stats_buffer, stats_buffer.stride(0), kl, grad_scale if grad_scale is not None else kl,
        grad, grad.stride(0), vocab, lam,
        HAS_STATS=stats is not None, WRITE_GRAD=grad_dtype is not None, HAS_SCALE=grad_scale is not None,
        BLOCK_V=block, num_warps=8 if block >= 2048 else 4,
    )
    return (kl if stats is None else None), stats_buffer, (grad if grad_dtype is not None else None)
