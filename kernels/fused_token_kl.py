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

Gradient strategy (`_chunked_rows` says why each): weight frozen, policy needs grad (LoRA) -> precompute the
direction G_n W in forward, 3 GEMMs in all, as many as autograd through materialised logits (2 forward, 1 backward);
weight needs grad -> keep per-row statistics only (lse(a), lse(b), E_π[gap]: [3, N]) and recompute both logit chunks
in backward, 6 GEMMs against autograd's 4 (two extra GEMMs buy O(C·V) memory instead of O(N·V)); nothing needs grad
-> 2 GEMMs.

The GEMMs go to cuBLAS (or the CPU BLAS) through torch.mm with fp32 output. The row work between them, over V: on
CUDA the Triton kernel in `_triton/token_kl_rows.py` (one program per row, one pass for the value), otherwise the same
chunks with in-place max/exp/sum and blocked row-wise dot products.
"""
from __future__ import annotations

import math

import torch

from ._chunked_rows import ChunkedLinearRowsFunction
from ._common import check_chunk_rows, check_head_inputs, default_chunk_rows, resolve_backend

# two logit blocks (policy, reference) and one scratch block in the torch form
_LOGIT_BLOCKS = 3
_DOT_COLUMNS = 8192  # vocabulary columns per product block in the torch form's row-wise dot products


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


def _token_kl_rows_torch(policy_logits, reference_logits, *, setting, stats=None, grad_scale=None, grad_dtype=None):
    """Row work on one chunk of fp32 logits [C, V] for both models (consumed: they are overwritten); `setting` is λ.

    Without `stats`: returns (out [C] float32, statistics [3, C], gradient factor or None). With `stats` (backward):
    skips the reductions and returns (None, stats, gradient factor). The gradient factor, in `grad_dtype`, is
    scale·G per row (module docstring), scale being `grad_scale` (the upstream gradient) or 1.
    """
    lam, gap, kl = setting, policy_logits - reference_logits, None
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


class FusedTokenKLFunction(ChunkedLinearRowsFunction):
    """Rows: policy_hidden and reference_hidden (both through the head); setting: lam; statistics: lse(a), lse(b),
    E_π[gap] [3, N]."""

    stats_shape = (3,)
    head_rows = 2
    torch_rows = staticmethod(_token_kl_rows_torch)

    @staticmethod
    def triton_rows():
        from ._triton.token_kl_rows import token_kl_rows

        return token_kl_rows


def _check_inputs(policy_hidden, reference_hidden, weight, lam, mask, chunk_size, op):
    check_head_inputs(op, {"policy_hidden": policy_hidden, "reference_hidden": reference_hidden}, weight)
    if not (isinstance(lam, (int, float)) and math.isfinite(lam) and 0.0 <= lam <= 1.0):
        raise ValueError(f"{op}: lam weighs KL(ref‖π) against KL(π‖ref) and must be a number in [0, 1], got {lam!r}")
    if mask is not None and (mask.dtype != torch.bool or mask.shape != (policy_hidden.shape[0],)
                             or mask.device != policy_hidden.device):
        raise ValueError(f"{op}: mask must be a bool tensor of shape [{policy_hidden.shape[0]}] on "
                         f"{policy_hidden.device}, got {mask.dtype} {list(mask.shape)} on {mask.device}")
    check_chunk_rows(chunk_size, op)


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
        return FusedTokenKLFunction.apply(policy_hidden, reference_hidden, weight, float(lam), chunk_rows, backend)
    # Gather the selected rows so masked-out positions cost no GEMM; index_select and index_copy carry the gradient
    # back to the selected rows of policy_hidden (zeros elsewhere).
    selected = mask.nonzero().squeeze(1)
    chunk_rows = chunk_size or default_chunk_rows(selected.shape[0], weight.shape[0], weight.dtype, _LOGIT_BLOCKS)
    kl_selected = FusedTokenKLFunction.apply(policy_hidden.index_select(0, selected),
                                      reference_hidden.index_select(0, selected), weight, float(lam), chunk_rows,
                                      backend)
    return kl_selected.new_zeros(policy_hidden.shape[0]).index_copy(0, selected, kl_selected)
