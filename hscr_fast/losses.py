"""Preference losses on sequence log-probabilities: MLPO (HSCR paper §3.3, Eqs. 5–7) and DPO, its K = 1 case.

Pure functions of log-prob tensors, so any listwise or pairwise preference trainer can import them.

Layout. `policy_logps` and `ref_logps` are [B, K+1]: column 0 holds log π(y_w) of the preferred response, columns 1..K
the dispreferred responses y_l1 ≻ y_l2 ≻ … ≻ y_lK ordered best-first (y_l1 is the closest to y_w). `valid` [B, K+1]
marks which responses exist: a prompt that kept k < K dispreferred responses has its last K−k columns invalid.
Invalid responses are masked out of every pair; whatever numbers sit in their cells (zeros, NaN, −inf) never reach the
loss or the gradient.

Math, with the implicit reward r(y) = γ·(log π(y) − log π_ref(y)):
    L_E(b) = −Σ_j        log σ(r(y_w) − r(y_lj))          over valid j              (Eq. 5, explicit)
    L_I(b) = −Σ_j Σ_{m>j} log σ(r(y_lj) − r(y_lm))        over valid j and m        (Eq. 6, implicit)
    L(b)   = L_E(b) + L_I(b)                                                         (Eq. 7)
    loss   = (1/B) · Σ_b weight_b · L(b)

Batch reduction (a choice the paper leaves open): every sample counts in the denominator B, including a sample with no
valid pair (only y_w valid, or implicit-only with k = 1). Such a sample contributes 0 to the sum. Dividing by B rather
than by the number of samples with pairs keeps the gradient scale independent of how many dispreferred responses
happened to survive re-ranking, and makes per-device losses under data parallelism average to the global one.
`weight` (MMedPO-style per-sample weighting) multiplies each sample's loss and is not normalised.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["mlpo_loss", "dpo_loss"]


def mlpo_loss(
    policy_logps: torch.Tensor,
    ref_logps: torch.Tensor,
    *,
    gamma: float = 0.1,
    valid: torch.Tensor | None = None,
    explicit: bool = True,
    implicit: bool = True,
    weight: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Multi-level preference loss (Eq. 7) and detached batch metrics.

    Args:
        policy_logps: [B, K+1] sequence log-probs (sum over answer tokens) under the trained policy; column 0 = y_w.
        ref_logps: [B, K+1] the same under the frozen reference model.
        gamma: reward scale γ (the β of DPO).
        valid: bool [B, K+1], True where the response exists; column 0 must be all True. None means all valid.
        explicit: include L_E (y_w against each y_lj) in the loss.
        implicit: include L_I (y_lj against each worse y_lm) in the loss.
        weight: optional [B] per-sample weight multiplying each sample's loss (no normalisation).

    Returns:
        (loss, metrics). `loss` is a scalar in float32 (float64 if the inputs are float64). `metrics` holds detached
        tensors, so logging them costs no device sync until the caller asks for `.item()`:
          loss, loss_explicit, loss_implicit: batch means of the (weighted) per-sample sums; both parts are reported
              whatever `explicit`/`implicit` say, and `loss` is the sum of the enabled parts.
          rewards [K+1]: mean reward of each column over its valid rows (NaN for a column with no valid row).
          reward_chosen: mean r(y_w); reward_rejected_mean: mean r(y_l) over all valid dispreferred responses.
          margin_explicit: mean of r(y_w) − r(y_lj) over valid explicit pairs.
          margin_implicit: mean of r(y_lj) − r(y_lm), j < m, over valid implicit pairs.
          accuracy_explicit / accuracy_implicit: fraction of those pairs with a strictly positive margin.
          num_pairs_explicit / num_pairs_implicit: how many valid pairs the batch held (int64).
        A margin or accuracy over zero pairs is NaN: there is nothing to measure, and 0 would read as "all wrong".
    """
    if not (explicit or implicit):
        raise ValueError("mlpo_loss: at least one of explicit=True or implicit=True is needed; both are off")
    valid = _check_inputs(policy_logps, ref_logps, valid, weight)
    compute_dtype = torch.promote_types(policy_logps.dtype, torch.float32)

    # Zero the rewards of missing responses before any arithmetic, so NaN/-inf placeholders in their cells cannot
    # produce NaN in the forward or the backward pass (torch.where routes a zero gradient to the unselected branch).
    log_ratio = policy_logps.to(compute_dtype) - ref_logps.to(compute_dtype)
    rewards = torch.where(valid, gamma * log_ratio, torch.zeros((), dtype=compute_dtype, device=log_ratio.device))

    chosen_rewards, rejected_rewards = rewards[:, :1], rewards[:, 1:]
    rejected_valid = valid[:, 1:]
    num_rejected = rejected_rewards.shape[1]

    explicit_margins = chosen_rewards - rejected_rewards  # [B, K]
    explicit_pairs = rejected_valid
    # implicit_margins[b, j, m] = r(y_lj) − r(y_lm); a pair counts when j < m (y_lj ranked better) and both exist.
    implicit_margins = rejected_rewards[:, :, None] - rejected_rewards[:, None, :]  # [B, K, K]
    better_before_worse = torch.ones(num_rejected, num_rejected, dtype=torch.bool, device=valid.device).triu(1)
    implicit_pairs = rejected_valid[:, :, None] & rejected_valid[:, None, :] & better_before_worse

    explicit_per_sample = -_masked_sum(F.logsigmoid(explicit_margins), explicit_pairs, dims=(1,))
    implicit_per_sample = -_masked_sum(F.logsigmoid(implicit_margins), implicit_pairs, dims=(1, 2))
    if weight is not None:
        weight = weight.to(compute_dtype)
        explicit_per_sample = explicit_per_sample * weight
        implicit_per_sample = implicit_per_sample * weight

    loss_explicit = explicit_per_sample.mean()
    loss_implicit = implicit_per_sample.mean()
    if explicit and implicit:
        loss = loss_explicit + loss_implicit
    elif explicit:
        loss = loss_explicit
    else:
        loss = loss_implicit

    with torch.no_grad():
        metrics = {
            "loss": loss.detach(),
            "loss_explicit": loss_explicit.detach(),
            "loss_implicit": loss_implicit.detach(),
            "rewards": _masked_mean(rewards, valid, dims=(0,)),
            "reward_chosen": _masked_mean(chosen_rewards, valid[:, :1]),
            "reward_rejected_mean": _masked_mean(rejected_rewards, rejected_valid),
            "margin_explicit": _masked_mean(explicit_margins, explicit_pairs),
            "margin_implicit": _masked_mean(implicit_margins, implicit_pairs),
            "accuracy_explicit": _masked_mean((explicit_margins > 0).to(compute_dtype), explicit_pairs),
            "accuracy_implicit": _masked_mean((implicit_margins > 0).to(compute_dtype), implicit_pairs),
            "num_pairs_explicit": explicit_pairs.sum(),
            "num_pairs_implicit": implicit_pairs.sum(),
        }
    return loss, metrics


def dpo_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    *,
    beta: float = 0.1,
    weight: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Standard DPO sigmoid loss, mean_b weight_b · −log σ(β·((π_c − π_ref,c) − (π_r − π_ref,r))).

    All four inputs are [B] sequence log-probs. This is `mlpo_loss` with K = 1 (a single pair has no implicit term), so
    it returns the same metrics dict; `accuracy_explicit` is the usual DPO reward accuracy.
    """
    others = {"policy_rejected": policy_rejected, "ref_chosen": ref_chosen, "ref_rejected": ref_rejected}
    for name, tensor in others.items():
        if tensor.shape != policy_chosen.shape:
            raise ValueError(f"dpo_loss: {name} has shape {tuple(tensor.shape)}, policy_chosen has "
                             f"{tuple(policy_chosen.shape)}; all four must be [B]")
    if policy_chosen.dim() != 1:
        raise ValueError(f"dpo_loss: expected [B] log-probs, got shape {tuple(policy_chosen.shape)}")
    policy_logps = torch.stack([policy_chosen, policy_rejected], dim=1)
    ref_logps = torch.stack([ref_chosen, ref_rejected], dim=1)
    return mlpo_loss(policy_logps, ref_logps, gamma=beta, explicit=True, implicit=False, weight=weight)


def _check_inputs(policy_logps, ref_logps, valid, weight) -> torch.Tensor:
    """Validate shapes and the mask; return the mask (all True when None)."""
    if policy_logps.dim() != 2 or policy_logps.shape[1] < 2:
        raise ValueError(f"mlpo_loss: policy_logps must be [B, K+1] with K >= 1 (column 0 = preferred), got shape "
                         f"{tuple(policy_logps.shape)}")
    if ref_logps.shape != policy_logps.shape:
        raise ValueError(f"mlpo_loss: ref_logps has shape {tuple(ref_logps.shape)} but policy_logps has "
                         f"{tuple(policy_logps.shape)}")
    if valid is None:
        valid = torch.ones(policy_logps.shape, dtype=torch.bool, device=policy_logps.device)
    else:
        if valid.dtype != torch.bool:
            raise ValueError(f"mlpo_loss: valid must be a bool mask, got dtype {valid.dtype}")
        if valid.shape != policy_logps.shape:
            raise ValueError(f"mlpo_loss: valid has shape {tuple(valid.shape)} but the log-probs have "
                             f"{tuple(policy_logps.shape)}")
        missing_preferred = (~valid[:, 0]).nonzero().flatten()
        if missing_preferred.numel():
            raise ValueError(f"mlpo_loss: the preferred response (column 0) must be valid in every row; rows "
                             f"{missing_preferred.tolist()[:10]} have valid[:, 0] = False")
    if weight is not None and weight.shape != policy_logps.shape[:1]:
        raise ValueError(f"mlpo_loss: weight must be [B] = [{policy_logps.shape[0]}], got {tuple(weight.shape)}")
    return valid


def _masked_sum(values: torch.Tensor, mask: torch.Tensor, dims: tuple[int, ...]) -> torch.Tensor:
    # where, not a multiply by the mask: a non-finite value in a masked cell must not make the sum NaN (inf·0 = NaN).
    return torch.where(mask, values, torch.zeros((), dtype=values.dtype, device=values.device)).sum(dim=dims)


def _masked_mean(values: torch.Tensor, mask: torch.Tensor, dims: tuple[int, ...] | None = None) -> torch.Tensor:
    """Mean of `values` over the True cells of `mask` (over `dims`, or everything); NaN where the mask is empty."""
    values = values.detach()
    if dims is None:
        dims = tuple(range(values.dim()))
    return _masked_sum(values, mask, dims) / mask.sum(dim=dims).to(values.dtype)
