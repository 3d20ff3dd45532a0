"""Listwise preference losses on sequence log-probabilities: MLPO (the HSCR paper, §3.3, Eqs. 5–7), DPO (its K = 1
case), the Plackett–Luce listwise DPO objective (Rafailov et al. 2023, DPO paper Appendix A.3) and LiPO-λ (Liu et al.
2024, "LiPO: Listwise Preference Optimization through Learning-to-Rank").

Pure functions of log-prob tensors, so any listwise or pairwise preference trainer can import them.

Layout. `policy_logps` and `ref_logps` are [B, K+1]: column 0 holds log π(y_w) of the preferred response, columns 1..K
the dispreferred responses y_l1 ≻ y_l2 ≻ … ≻ y_lK ordered best-first (y_l1 is the closest to y_w). `valid` [B, K+1]
marks which responses exist: a prompt that kept k < K dispreferred responses has its last K−k columns invalid.
Invalid responses are left out of every term; whatever numbers sit in their cells (zeros, NaN, −inf) never reach the
loss or the gradient. Every loss works on the implicit reward r(y) = γ·(log π(y) − log π_ref(y)).

MLPO:
    L_E(b) = −Σ_j        log σ(r(y_w) − r(y_lj))          over valid j              (Eq. 5, explicit)
    L_I(b) = −Σ_j Σ_{m>j} log σ(r(y_lj) − r(y_lm))        over valid j and m        (Eq. 6, implicit)
    L(b)   = L_E(b) + L_I(b)                                                         (Eq. 7)
Plackett–Luce, with the valid responses of row b in column order y_(1) ≻ … ≻ y_(n):
    L(b)   = −Σ_{i=1..n} [ r(y_(i)) − log Σ_{m≥i} exp r(y_(m)) ]
LiPO-λ, with labels ψ (higher = better), gains G = 2^ψ − 1, and τ(i) the 1-based position of response i when the
row's valid responses are sorted by their current reward r, highest first:
    L(b)   = −Σ_{ψ_i > ψ_j} |G_i − G_j| · |1/log2(1+τ(i)) − 1/log2(1+τ(j))| · log σ(r(y_i) − r(y_j))

Batch reduction (a choice the papers leave open): `reduction="mean"` returns (1/B) · Σ_b weight_b · L(b), where every
sample counts in the denominator B, including a sample with nothing to compare (only y_w valid). Such a sample
contributes 0 to the sum. Dividing by B rather than by the number of samples with pairs keeps the gradient scale
independent of how many dispreferred responses happened to survive re-ranking, and makes per-device losses under
data parallelism average to the global one. `reduction="none"` returns the per-sample losses weight_b · L(b) [B].
`weight` (MMedPO-style per-sample weighting) multiplies each sample's loss and is not normalised.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = ["REDUCTIONS", "dpo_loss", "lipo_lambda_loss", "mlpo_loss", "plackett_luce_loss"]

REDUCTIONS = ("mean", "none")


def mlpo_loss(
    policy_logps: torch.Tensor,
    ref_logps: torch.Tensor,
    *,
    gamma: float = 0.1,
    valid: torch.Tensor | None = None,
    explicit: bool = True,
    implicit: bool = True,
    weight: torch.Tensor | None = None,
    reduction: str = "mean",
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
        reduction: "mean" (a scalar, the batch mean) or "none" (the [B] per-sample losses).

    Returns:
        (loss, metrics). `loss` is float32 (float64 if the inputs are float64). `metrics` holds detached tensors, so
        logging them costs no device sync until the caller asks for `.item()`:
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
    valid = _check_inputs("mlpo_loss", policy_logps, ref_logps, valid, weight, reduction)
    rewards = _rewards(policy_logps, ref_logps, gamma, valid)
    pairs = _RankedPairs(rewards, valid)

    explicit_per_sample = _weighted(-_masked_sum(F.logsigmoid(pairs.explicit_margins), pairs.explicit, dims=(1,)),
                                    weight)
    implicit_per_sample = _weighted(-_masked_sum(F.logsigmoid(pairs.implicit_margins), pairs.implicit, dims=(1, 2)),
                                    weight)
    if explicit and implicit:
        per_sample = explicit_per_sample + implicit_per_sample
    elif explicit:
        per_sample = explicit_per_sample
    else:
        per_sample = implicit_per_sample

    metrics = pairs.metrics(per_sample)
    metrics["loss_explicit"] = explicit_per_sample.detach().mean()
    metrics["loss_implicit"] = implicit_per_sample.detach().mean()
    return _reduce(per_sample, reduction), metrics


def dpo_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    *,
    beta: float = 0.1,
    weight: torch.Tensor | None = None,
    reduction: str = "mean",
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Standard DPO sigmoid loss, weight_b · −log σ(β·((π_c − π_ref,c) − (π_r − π_ref,r))), batch mean or per sample.

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
    return mlpo_loss(policy_logps, ref_logps, gamma=beta, explicit=True, implicit=False, weight=weight,
                     reduction=reduction)


def plackett_luce_loss(
    policy_logps: torch.Tensor,
    ref_logps: torch.Tensor,
    *,
    gamma: float = 0.1,
    valid: torch.Tensor | None = None,
    weight: torch.Tensor | None = None,
    reduction: str = "mean",
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Plackett–Luce listwise DPO (DPO paper, Appendix A.3): the negative log-likelihood of the list's ranking when
    each place is filled by a softmax over the implicit rewards of the responses not yet placed.

    The columns' order is the ranking (column 0 best); invalid columns are skipped, so a row with n valid responses
    is the ranking of those n. With two responses this is exactly DPO. Arguments, metrics and reduction as in
    `mlpo_loss` (no loss_explicit / loss_implicit: this loss has no such split).
    """
    valid = _check_inputs("plackett_luce_loss", policy_logps, ref_logps, valid, weight, reduction)
    rewards = _rewards(policy_logps, ref_logps, gamma, valid)
    width = rewards.shape[1]
    # not_yet_placed[b, i, m]: response m still competes for place i, i.e. m is valid and ranked at or after i.
    at_or_after = torch.ones(width, width, dtype=torch.bool, device=valid.device).triu()
    not_yet_placed = at_or_after[None] & valid[:, None, :]
    # The diagonal is always in the set (an invalid i competes only with itself), so no log-sum-exp runs over an
    # empty set: that would give −inf in the forward and NaN in the backward even where the term is masked out.
    not_yet_placed |= torch.eye(width, dtype=torch.bool, device=valid.device)[None]
    competing = torch.where(not_yet_placed, rewards[:, None, :], torch.full((), -math.inf, dtype=rewards.dtype,
                                                                            device=rewards.device))
    log_place_prob = rewards - torch.logsumexp(competing, dim=2)  # [B, K+1]: log P(response i takes place i)
    per_sample = _weighted(-_masked_sum(log_place_prob, valid, dims=(1,)), weight)
    return _reduce(per_sample, reduction), _RankedPairs(rewards, valid).metrics(per_sample)


def lipo_lambda_loss(
    policy_logps: torch.Tensor,
    ref_logps: torch.Tensor,
    *,
    gamma: float = 0.1,
    valid: torch.Tensor | None = None,
    labels: torch.Tensor | None = None,
    weight: torch.Tensor | None = None,
    reduction: str = "mean",
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """LiPO-λ (Liu et al. 2024): a pairwise logistic loss over every pair of responses with different labels, each
    pair weighted by its LambdaRank weight |G_i − G_j| · |1/D(τ_i) − 1/D(τ_j)|.

    G = 2^ψ − 1 are gains from the labels ψ; D(τ) = log2(1 + τ) discounts by τ, the response's 1-based position in the
    row when its valid responses are sorted by current implicit reward, highest first (ties: the lower column first).
    The weights are piecewise constant in the rewards, so no gradient flows through them.

    Args:
        labels: optional [B, K+1] float ψ, higher = better (e.g. a reward model's scores; LiPO scales them to [0, 1]).
            None derives them from the columns' order: the n valid responses of a row, best first, get
            ψ = (n−1)/(n−1), (n−2)/(n−1), …, 0 — evenly spaced in [0, 1], so the worst response has gain 0.
        The rest as in `mlpo_loss` (no loss_explicit / loss_implicit).
    """
    valid = _check_inputs("lipo_lambda_loss", policy_logps, ref_logps, valid, weight, reduction)
    rewards = _rewards(policy_logps, ref_logps, gamma, valid)
    if labels is None:
        labels = _rank_order_labels(valid, rewards.dtype)
    else:
        if labels.shape != rewards.shape:
            raise ValueError(f"lipo_lambda_loss: labels has shape {tuple(labels.shape)} but the log-probs have "
                             f"{tuple(rewards.shape)}")
        if not torch.isfinite(labels[valid]).all():
            raise ValueError("lipo_lambda_loss: labels must be finite at every valid response")
        labels = labels.to(rewards.dtype)

    with torch.no_grad():
        gains = torch.where(valid, torch.exp2(labels) - 1, torch.zeros((), dtype=rewards.dtype, device=valid.device))
        discounts = 1.0 / torch.log2(1.0 + _reward_rank_positions(rewards, valid).to(rewards.dtype))
        lambda_weights = (gains[:, :, None] - gains[:, None, :]).abs() * (
            discounts[:, :, None] - discounts[:, None, :]).abs()
        # Pair (i, j) with i labelled better than j; both must exist.
        labelled_better = (labels[:, :, None] > labels[:, None, :]) & valid[:, :, None] & valid[:, None, :]
    pair_losses = -lambda_weights * F.logsigmoid(rewards[:, :, None] - rewards[:, None, :])
    per_sample = _weighted(_masked_sum(pair_losses, labelled_better, dims=(1, 2)), weight)
    return _reduce(per_sample, reduction), _RankedPairs(rewards, valid).metrics(per_sample)


def _rank_order_labels(valid: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """ψ evenly spaced in [0, 1] by position among the row's valid columns, best (first) = 1, worst = 0."""
    count = valid.sum(dim=1, keepdim=True)
    position = valid.long().cumsum(dim=1) - 1  # 0-based position among valid columns (meaningless where invalid)
    spread = (count - 1).clamp(min=1).to(dtype)
    return torch.where(valid, (count - 1 - position).to(dtype) / spread, torch.zeros((), dtype=dtype,
                                                                                      device=valid.device))


def _reward_rank_positions(rewards: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """τ [B, K+1]: 1 + the number of valid responses of the row ranked above each one by reward (ties: lower column
    first). Counting beats sorting here: lists are a handful of responses, and the result needs no scatter back."""
    width = rewards.shape[1]
    column = torch.arange(width, device=rewards.device)
    earlier_column = column[:, None] > column[None, :]  # [i, m]: m is a lower column than i
    above = (rewards[:, None, :] > rewards[:, :, None]) | (
        (rewards[:, None, :] == rewards[:, :, None]) & earlier_column[None])  # [b, i, m]: m ranks above i
    return 1 + (above & valid[:, None, :]).sum(dim=2)


def _rewards(policy_logps, ref_logps, gamma, valid) -> torch.Tensor:
    """r = γ·(log π − log π_ref) in at least float32, with missing responses set to 0 before any arithmetic, so NaN or
    −inf placeholders in their cells cannot produce NaN in the forward or the backward pass (torch.where routes a
    zero gradient to the unselected branch)."""
    compute_dtype = torch.promote_types(policy_logps.dtype, torch.float32)
    log_ratio = policy_logps.to(compute_dtype) - ref_logps.to(compute_dtype)
    return torch.where(valid, gamma * log_ratio, torch.zeros((), dtype=compute_dtype, device=log_ratio.device))


class _RankedPairs:
    """The pairs a best-first list implies: explicit (y_w against each valid y_lj) and implicit (y_lj against each
    worse valid y_lm), with their reward margins. Every loss reports its batch metrics on these pairs, so runs with
    different losses log comparable numbers."""

    def __init__(self, rewards: torch.Tensor, valid: torch.Tensor):
        self.rewards, self.valid = rewards, valid
        rejected_rewards, rejected_valid = rewards[:, 1:], valid[:, 1:]
        num_rejected = rejected_rewards.shape[1]
        self.explicit_margins = rewards[:, :1] - rejected_rewards  # [B, K]
        self.explicit = rejected_valid
        # implicit_margins[b, j, m] = r(y_lj) − r(y_lm); a pair counts when j < m (y_lj ranked better), both exist.
        self.implicit_margins = rejected_rewards[:, :, None] - rejected_rewards[:, None, :]  # [B, K, K]
        better_before_worse = torch.ones(num_rejected, num_rejected, dtype=torch.bool, device=valid.device).triu(1)
        self.implicit = rejected_valid[:, :, None] & rejected_valid[:, None, :] & better_before_worse

    def metrics(self, per_sample_loss: torch.Tensor) -> dict[str, torch.Tensor]:
        rewards, valid = self.rewards, self.valid
        with torch.no_grad():
            return {
                "loss": per_sample_loss.detach().mean(),
                "rewards": _masked_mean(rewards, valid, dims=(0,)),
                "reward_chosen": _masked_mean(rewards[:, :1], valid[:, :1]),
                "reward_rejected_mean": _masked_mean(rewards[:, 1:], valid[:, 1:]),
                "margin_explicit": _masked_mean(self.explicit_margins, self.explicit),
                "margin_implicit": _masked_mean(self.implicit_margins, self.implicit),
                "accuracy_explicit": _masked_mean((self.explicit_margins > 0).to(rewards.dtype), self.explicit),
                "accuracy_implicit": _masked_mean((self.implicit_margins > 0).to(rewards.dtype), self.implicit),
                "num_pairs_explicit": self.explicit.sum(),
                "num_pairs_implicit": self.implicit.sum(),
            }


def _weighted(per_sample: torch.Tensor, weight: torch.Tensor | None) -> torch.Tensor:
    return per_sample if weight is None else per_sample * weight.to(per_sample.dtype)


def _reduce(per_sample: torch.Tensor, reduction: str) -> torch.Tensor:
    return per_sample.mean() if reduction == "mean" else per_sample


def _check_inputs(name, policy_logps, ref_logps, valid, weight, reduction) -> torch.Tensor:
    """Validate shapes, the mask and the reduction; return the mask (all True when None)."""
    if reduction not in REDUCTIONS:
        raise ValueError(f"{name}: reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if policy_logps.dim() != 2 or policy_logps.shape[1] < 2:
        raise ValueError(f"{name}: policy_logps must be [B, K+1] with K >= 1 (column 0 = preferred), got shape "
                         f"{tuple(policy_logps.shape)}")
    if ref_logps.shape != policy_logps.shape:
        raise ValueError(f"{name}: ref_logps has shape {tuple(ref_logps.shape)} but policy_logps has "
                         f"{tuple(policy_logps.shape)}")
    if valid is None:
        valid = torch.ones(policy_logps.shape, dtype=torch.bool, device=policy_logps.device)
    else:
        if valid.dtype != torch.bool:
            raise ValueError(f"{name}: valid must be a bool mask, got dtype {valid.dtype}")
        if valid.shape != policy_logps.shape:
            raise ValueError(f"{name}: valid has shape {tuple(valid.shape)} but the log-probs have "
                             f"{tuple(policy_logps.shape)}")
        missing_preferred = (~valid[:, 0]).nonzero().flatten()
        if missing_preferred.numel():
            raise ValueError(f"{name}: the preferred response (column 0) must be valid in every row; rows "
                             f"{missing_preferred.tolist()[:10]} have valid[:, 0] = False")
    if weight is not None and weight.shape != policy_logps.shape[:1]:
        raise ValueError(f"{name}: weight must be [B] = [{policy_logps.shape[0]}], got {tuple(weight.shape)}")
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
