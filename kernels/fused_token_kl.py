"""Fused linear + bidirectional token KL between the policy's and the reference's next-token distributions.

Math, for row n (an answer position) with policy hidden state h_n, reference hidden state r_n (both [D]), lm_head
weight W [V, D] (no bias) and mixing weight λ ∈ [0, 1]:

    a = W h_n  (policy logits)       b = W r_n  (reference logits)       gap = a − b
    π = softmax(a)    ρ = softmax(b)    Δ = lse(a) − lse(b)              so  log π − log ρ = gap − Δ
    KL(π‖ρ) = Σ π (log π − log ρ) = E_π[gap] − Δ          KL(ρ‖π) = Σ ρ (log ρ − log π) = Δ − E_ρ[gap]
    out_n   = λ·KL(ρ‖π) + (1−λ)·KL(π‖ρ) = (1−λ)·E_π[gap] − λ·E_ρ[gap] + (2λ−1)·Δ          (0 at masked-out rows)

E_π[gap] and E_ρ[gap] need no normalised probabilities, so one pass over V suffices: per BLOCK_V tile, online updates
of the running max m, Σ exp(a − m) and Σ exp(a − m)·gap for the policy, and the same three for the reference; each
time a max grows, both of its sums are rescaled by exp(m_old − m_new). Δ appears with weight 2λ−1 (at the default
λ = 0.5, half the Jeffreys divergence, it drops out). It is formed as (m_a − m_b) + log(s_a / s_b) from the maxima
and sums, not as lse(a) − lse(b): close maxima subtract exactly and the ratio of sums is near 1, so Δ carries a few
ulps of itself instead of a few ulps of |lse| (~1e-6 for logits of order 10, a 1% error on the KL of order 1e-4 at
the start of training). KL ≥ 0, so the row value is clamped at 0 against rounding. Identical inputs give gap = 0 and
Δ = 0 exactly: a KL of exactly 0.

Gradient w.r.t. the policy logits a (the reference is a constant: stop-gradient, no gradient to r or through b):

    ∂KL(π‖ρ)/∂a = π ⊙ ((log π − log ρ) − KL(π‖ρ)) = π ⊙ (gap − E_π[gap])        (the Δ terms cancel)
    ∂KL(ρ‖π)/∂a = π − ρ
    ∂out_n/∂a  = G_n = λ·(π − ρ) + (1−λ)·π ⊙ (gap − E_π[gap])
    ∂out/∂h_n  = g_n·G_n W            ∂out/∂W = Σ_n g_n G_nᵀ h_n   (policy side only; g = upstream gradient)

Writing the forward KL's gradient with raw logits, as π ⊙ (gap − E_π[gap]), needs only E_π[gap], which forward keeps;
π and ρ are exp(a − lse(a)) and exp(b − lse(b)) from the kept logsumexps. A weight that requires grad gets its
gradient through the policy logits only: the reference distribution is a fixed target.

Memory. Rows go through in chunks of C rows; the chunk's two fp32 logit blocks [C, V] (plus one [C, V] scratch in the
torch form, and for bf16/fp16 weights the gradient factor [C, V] in the weight dtype that feeds the next GEMM) are the
only vocabulary-sized buffers alive. [N, V] is never stored, in forward or backward. C defaults to the rows that fit
in 1/8 of what one materialised logits tensor would take (at least 32 MiB). With a mask, only the selected rows are
gathered and computed: masked-out rows cost no GEMM, for one host sync (the count of selected rows).

Gradient strategy, as in fused_linear_logprobs, chosen in forward from which inputs need a gradient:
  * weight frozen, policy needs grad (LoRA) -> precompute. out_n is a per-row scalar, so the upstream gradient only
    rescales row n; forward forms the direction G_n W while π and ρ are at hand (a third GEMM per chunk) and keeps it,
    [N, D] in the hidden dtype; backward is one multiply. 3 GEMMs in all, as many as autograd through materialised
    logits (2 forward, 1 backward), and no recompute.
  * weight needs grad -> recompute. Σ_n g_n G_nᵀ h_n weighs rows by g before summing, so forward keeps per-row
    statistics only (lse(a), lse(b), E_π[gap]: [3, N]); backward recomputes both logit chunks and runs the two
    gradient GEMMs. 6 GEMMs against autograd's 4: two extra GEMMs buy O(C·V) memory instead of O(N·V).
  * nothing needs grad -> forward only, 2 GEMMs.

Triton form (CUDA): the GEMMs go to cuBLAS through torch.mm with fp32 output. `_token_kl_rows_kernel` does the
vocabulary-wide row work, one program per row, int64 row offsets:
  pass 1 (forward): online maxima and sums of both rows: reads 2·4·V bytes, writes 16 bytes (value + statistics);
  pass 2 (gradient wanted): g_n·G_n from both rows and the statistics: reads 2·4·V bytes, writes V·itemsize bytes
  (in place over the policy logits when the weight is fp32).
Torch form (CPU, or no triton): the same chunks with in-place max/exp/sum and blocked row-wise dot products.
"""
from __future__ import annotations

import functools
import math

import torch
from torch.autograd.function import once_differentiable

from ._common import (
    compute_dtype,
    default_chunk_rows,
    linear_logits_fp32,
    recompute_linear_grads,
    rescale_direction,
    resolve_backend,
)

# two logit blocks (policy, reference) and one scratch block in the torch form
_LOGIT_BLOCKS = 3
_MAX_BLOCK_V = 4096
_DOT_COLUMNS = 8192  # vocabulary columns per product block in the torch form's row-wise dot products

# triton.language and the kernel, bound by _triton_kernels() on first use (see there).
tl = None
_token_kl_rows_kernel = None


@functools.cache
def _triton_kernels():
    """Import triton and define the kernel on the first Triton-path call, not at module import.

    `import hscr_fast.kernels` must work where triton is not installed (macOS), and Triton decides between compiling
    and interpreting (TRITON_INTERPRET) when a kernel is decorated, so tests can still set it at their import time.
    The names are module globals (`global`) because Triton resolves a kernel's names through its module's globals.
    """
    global tl, _token_kl_rows_kernel
    import triton
    import triton.language as tl

    @triton.jit
    def _token_kl_rows_kernel(
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

                new_max = tl.maximum(max_policy, tl.max(a, 0))
                rescale = tl.exp(max_policy - new_max)
                weights = tl.exp(a - new_max)
                sum_policy = sum_policy * rescale + tl.sum(weights, 0)
                gap_sum_policy = gap_sum_policy * rescale + tl.sum(weights * gap, 0)
                max_policy = new_max

                new_max = tl.maximum(max_reference, tl.max(b, 0))
                rescale = tl.exp(max_reference - new_max)
                weights = tl.exp(b - new_max)
                sum_reference = sum_reference * rescale + tl.sum(weights, 0)
                gap_sum_reference = gap_sum_reference * rescale + tl.sum(weights * gap, 0)
                max_reference = new_max
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
            if HAS_SCALE:
                scale = tl.load(scale_ptr + row).to(tl.float32)
            else:
                scale = 1.0
            grad_row = grad_ptr + row * grad_row_stride
            for start in range(0, n_cols, BLOCK_V):
                cols = start + tl.arange(0, BLOCK_V)
                in_row = cols < n_cols
                a = tl.load(policy_row + cols, mask=in_row, other=0.0).to(tl.float32)
                b = tl.load(reference_row + cols, mask=in_row, other=0.0).to(tl.float32)
                policy_prob = tl.exp(a - lse_policy)
                reference_prob = tl.exp(b - lse_reference)
                grad = lam * (policy_prob - reference_prob) + (1.0 - lam) * policy_prob * ((a - b) - mean_gap)
                tl.store(grad_row + cols, (grad * scale).to(grad_ptr.dtype.element_ty), mask=in_row)

    return _token_kl_rows_kernel


def _token_kl_rows_triton(policy_logits, reference_logits, lam, *, stats=None, grad_scale=None, grad_dtype=None):
    """Triton form of `_token_kl_rows_torch` (same arguments and results)."""
    import triton

    kernel = _triton_kernels()
    rows, vocab = policy_logits.shape
    kl = policy_logits.new_empty(rows, dtype=torch.float32)
    stats_buffer = stats if stats is not None else policy_logits.new_empty(3, rows, dtype=torch.float32)
    if grad_dtype is None or grad_dtype == policy_logits.dtype:
        grad = policy_logits  # written in place (or not at all): each tile is read before it is overwritten
    else:
        grad = policy_logits.new_empty(rows, vocab, dtype=grad_dtype)
    block = min(_MAX_BLOCK_V, triton.next_power_of_2(vocab))
    kernel[(rows,)](
        policy_logits, policy_logits.stride(0), reference_logits, reference_logits.stride(0),
        stats_buffer, stats_buffer.stride(0), kl, grad_scale if grad_scale is not None else kl,
        grad, grad.stride(0), vocab, lam,
        HAS_STATS=stats is not None, WRITE_GRAD=grad_dtype is not None, HAS_SCALE=grad_scale is not None,
        BLOCK_V=block, num_warps=8 if block >= 2048 else 4,
    )
    return (kl if stats is None else None), stats_buffer, (grad if grad_dtype is not None else None)


def _max_and_sumexp_(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Row max m and Σ exp(logits − m); leaves exp(logits − m) in `logits` (in place)."""
    row_max = logits.amax(dim=1)
    return row_max, logits.sub_(row_max[:, None]).exp_().sum(dim=1)


def _row_dots(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Σ_v x[:, v]·y[:, v] per row, summed by torch.sum over column blocks: einsum/bmm accumulate sequentially (an
    error some 30x larger at V = 32000) and linalg.vecdot would form the whole [C, V] product."""
    total = x.new_zeros(x.shape[0])
    for start in range(0, x.shape[1], _DOT_COLUMNS):
        columns = slice(start, start + _DOT_COLUMNS)
        total += (x[:, columns] * y[:, columns]).sum(dim=1)
    return total


def _token_kl_rows_torch(policy_logits, reference_logits, lam, *, stats=None, grad_scale=None, grad_dtype=None):
    """Row work on one chunk of fp32 logits [C, V] for both models (consumed: they are overwritten).

    Without `stats`: returns (out [C] float32, statistics [3, C], gradient factor or None). With `stats` (backward):
    skips the reductions and returns (None, stats, gradient factor). The gradient factor, in `grad_dtype`, is
    scale·G per row (module docstring), scale being `grad_scale` (the upstream gradient) or 1.
    """
    gap = policy_logits - reference_logits
    kl = None
    if stats is None:
        max_policy, sum_policy = _max_and_sumexp_(policy_logits)
        max_reference, sum_reference = _max_and_sumexp_(reference_logits)
        policy_prob = policy_logits.div_(sum_policy[:, None])
        reference_prob = reference_logits.div_(sum_reference[:, None])
        mean_gap = _row_dots(policy_prob, gap)
        mean_gap_reference = _row_dots(reference_prob, gap)
        log_ratio = (max_policy - max_reference) + torch.log(sum_policy / sum_reference)  # Δ, see the docstring
        kl = (1 - lam) * mean_gap - lam * mean_gap_reference + (2 * lam - 1) * log_ratio
        kl = kl.clamp_min_(0).float()
        stats = torch.stack([max_policy + sum_policy.log(), max_reference + sum_reference.log(), mean_gap])
    else:
        lse_policy, lse_reference, mean_gap = stats
        policy_prob = policy_logits.sub_(lse_policy[:, None]).exp_()
        reference_prob = reference_logits.sub_(lse_reference[:, None]).exp_()
    if grad_dtype is None:
        return kl, stats, None
    grad = gap.sub_(mean_gap[:, None]).mul_(policy_prob).mul_(1 - lam)
    grad.add_(policy_prob.sub_(reference_prob), alpha=lam)
    if grad_scale is not None:
        grad.mul_(grad_scale.to(grad.dtype)[:, None])
    return kl, stats, grad.to(grad_dtype)


def _token_kl_rows(backend, *args, **kwargs):
    return (_token_kl_rows_triton if backend == "triton" else _token_kl_rows_torch)(*args, **kwargs)


class _FusedTokenKL(torch.autograd.Function):
    @staticmethod
    def forward(ctx, policy_hidden, reference_hidden, weight, lam, chunk_rows, backend):
        policy_needs_grad, weight_needs_grad = ctx.needs_input_grad[0], ctx.needs_input_grad[2]
        precompute = policy_needs_grad and not weight_needs_grad
        rows = policy_hidden.shape[0]
        kl = policy_hidden.new_empty(rows, dtype=torch.float32)
        # per-row lse(a), lse(b), E_π[gap]: what backward needs to rebuild π, ρ and the gradient factor
        stats = policy_hidden.new_empty(
            3, rows, dtype=torch.float32 if backend == "triton" else compute_dtype(policy_hidden.dtype)
        )
        direction = torch.empty_like(policy_hidden, memory_format=torch.contiguous_format) if precompute else None
        for start in range(0, rows, chunk_rows):
            chunk = slice(start, start + chunk_rows)
            kl[chunk], stats[:, chunk], grad_factor = _token_kl_rows(
                backend, linear_logits_fp32(policy_hidden[chunk], weight),
                linear_logits_fp32(reference_hidden[chunk], weight), lam,
                grad_dtype=weight.dtype if precompute else None,
            )
            if precompute:
                torch.mm(grad_factor, weight, out=direction[chunk])
        ctx.strategy = "precompute" if precompute else ("recompute" if weight_needs_grad else "none")
        ctx.lam, ctx.chunk_rows, ctx.backend = lam, chunk_rows, backend
        if precompute:
            ctx.save_for_backward(direction)
        elif weight_needs_grad:
            ctx.save_for_backward(policy_hidden, reference_hidden, weight, stats)
        return kl

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_kl):
        if ctx.strategy == "precompute":
            (direction,) = ctx.saved_tensors
            return rescale_direction(direction, grad_kl), None, None, None, None, None
        policy_hidden, reference_hidden, weight, stats = ctx.saved_tensors
        grad_kl = grad_kl.float().contiguous()

        def grad_factor_of(chunk):
            return _token_kl_rows(ctx.backend, linear_logits_fp32(policy_hidden[chunk], weight),
                                  linear_logits_fp32(reference_hidden[chunk], weight), ctx.lam, stats=stats[:, chunk],
                                  grad_scale=grad_kl[chunk], grad_dtype=weight.dtype)[2]

        grad_policy, grad_weight = recompute_linear_grads(policy_hidden, weight, ctx.chunk_rows,
                                                          ctx.needs_input_grad[0], grad_factor_of)
        return grad_policy, None, grad_weight, None, None, None


def _check_inputs(policy_hidden, reference_hidden, weight, lam, mask, chunk_size, op):
    if policy_hidden.dim() != 2 or weight.dim() != 2 or reference_hidden.shape != policy_hidden.shape:
        raise ValueError(f"{op}: policy_hidden and reference_hidden must both be [N, D] and weight [V, D], got "
                         f"{list(policy_hidden.shape)}, {list(reference_hidden.shape)} and {list(weight.shape)}")
    if policy_hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"{op}: hidden states have D={policy_hidden.shape[1]} but weight has D={weight.shape[1]} "
                         "(weight is [V, D])")
    if not weight.is_floating_point() or not policy_hidden.dtype == reference_hidden.dtype == weight.dtype:
        raise TypeError(f"{op}: policy_hidden, reference_hidden and weight must share one floating dtype, got "
                        f"{policy_hidden.dtype}, {reference_hidden.dtype} and {weight.dtype}")
    if not policy_hidden.device == reference_hidden.device == weight.device:
        raise ValueError(f"{op}: policy_hidden, reference_hidden and weight must be on one device, got "
                         f"{policy_hidden.device}, {reference_hidden.device}, {weight.device}")
    if weight.shape[0] == 0:
        raise ValueError(f"{op}: weight has an empty vocabulary")
    if not (isinstance(lam, (int, float)) and math.isfinite(lam) and 0.0 <= lam <= 1.0):
        raise ValueError(f"{op}: lam weighs KL(ref‖π) against KL(π‖ref) and must be a number in [0, 1], got {lam!r}")
    if mask is not None and (mask.dtype != torch.bool or mask.shape != (policy_hidden.shape[0],)
                             or mask.device != policy_hidden.device):
        raise ValueError(f"{op}: mask must be a bool tensor of shape [{policy_hidden.shape[0]}] on "
                         f"{policy_hidden.device}, got {mask.dtype} {list(mask.shape)} on {mask.device}")
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"{op}: chunk_size must be a positive number of rows, got {chunk_size}")


def fused_token_kl(
    policy_hidden: torch.Tensor,
    reference_hidden: torch.Tensor,
    weight: torch.Tensor,
    *,
    lam: float = 0.5,
    mask: torch.Tensor | None = None,
    chunk_size: int | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Per-token λ·KL(ref‖π) + (1−λ)·KL(π‖ref) of softmax(hidden @ weight.T), as float32 [N]; 0 where mask is False.

    policy_hidden and reference_hidden [N, D] are the two models' final hidden states at the same positions (usually
    answer positions), weight [V, D] the shared lm_head (no bias); all three share one floating dtype (bf16/fp16/fp32
    accumulate in fp32; fp64 stays fp64 in the torch form). `mask` [N] bool selects the rows to compute (None: all).
    Differentiable in `policy_hidden`, and in `weight` when it requires grad, through the policy's distribution only:
    `reference_hidden` is detached and the reference distribution is a constant target. See the module docstring for
    the math, the gradient and the memory behaviour. `chunk_size`: rows whose logits exist at once (default: 1/8 of
    one full logits tensor's memory, at least 32 MiB). `backend`: "auto" (Triton on CUDA, torch otherwise), "triton"
    or "torch".
    """
    op = "fused_token_kl"
    _check_inputs(policy_hidden, reference_hidden, weight, lam, mask, chunk_size, op)
    backend = resolve_backend(backend, policy_hidden.device)
    reference_hidden = reference_hidden.detach()
    if mask is None:
        chunk_rows = chunk_size or default_chunk_rows(policy_hidden.shape[0], weight.shape[0], weight.dtype,
                                                      _LOGIT_BLOCKS)
        return _FusedTokenKL.apply(policy_hidden, reference_hidden, weight, float(lam), chunk_rows, backend)
    # Gather the selected rows so masked-out positions cost no GEMM; index_select and index_copy carry the gradient
    # back to the selected rows of policy_hidden (zeros elsewhere).
    selected = mask.nonzero().squeeze(1)
    chunk_rows = chunk_size or default_chunk_rows(selected.shape[0], weight.shape[0], weight.dtype, _LOGIT_BLOCKS)
    kl_selected = _FusedTokenKL.apply(policy_hidden.index_select(0, selected),
                                      reference_hidden.index_select(0, selected), weight, float(lam), chunk_rows,
                                      backend)
    return kl_selected.new_zeros(policy_hidden.shape[0]).index_copy(0, selected, kl_selected)
