"""The training objective of one batch of preference lists, split in two so that held-out evaluation reuses it exactly.

- `score_batch`: the listwise prefix-shared forward of each prompt's responses → sequence log-probs under the policy,
  the cached reference log-probs, the valid-response mask, per-sample weights and (when token-level alignment is on)
  each sample's token KL to the reference. Everything the loss needs, nothing vocabulary-sized.
- `batch_loss`: the preference loss (MLPO, DPO, weighted DPO, Plackett–Luce or LiPO-λ) plus the weighted token KL,
  from those tensors alone.

Because `batch_loss` needs only per-sample tensors, held-out evaluation (`hscr_fast.training.heldout`) scores its
batches with
`score_batch`, concatenates them (`concat_scored`) and calls `batch_loss` once on the whole set: the held-out metrics
are exact set-wide values, not averages of batch averages.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from hscr_fast.data.records import DataFormatError

# The losses that use every response of a list; dpo and weighted-dpo use y_w against y_l1 only.
LISTWISE_LOSSES = ("mlpo", "plackett-luce", "lipo-lambda")


@dataclass
class ScoredBatch:
    policy_logps: torch.Tensor  # [B, S] log π(y) per response slot (column 0 = y_w)
    ref_logps: torch.Tensor  # [B, S] log π_ref(y), from the cache
    valid: torch.Tensor  # [B, S] bool: the response exists
    weights: torch.Tensor | None  # [B] per-sample loss weights, None when all are 1
    token_kl: torch.Tensor | None  # [B] token KL to the reference on the covered tokens, None when off
    num_real_tokens: int  # unpadded tokens the forward processed (throughput)


def sample_weights(items, config, kind_weights: dict[str, float], device) -> torch.Tensor | None:
    """Per-sample loss weights: the record's own `weight` (weighted-dpo: required; the listwise losses: used when
    present; dpo: ignored) times its kind's weight. None when every weight is 1."""
    values = []
    for item in items:
        weight = 1.0
        if config.loss == "weighted-dpo":
            if item.weight is None:
                raise DataFormatError(f"--loss weighted-dpo needs a 'weight' on every preference record; "
                                 f"id {item.id!r} has none")
            weight = item.weight
        elif config.loss in LISTWISE_LOSSES and item.weight is not None:
            weight = item.weight
        values.append(weight * kind_weights.get(item.kind, 1.0))
    if all(v == 1.0 for v in values):
        return None
    return torch.tensor(values, dtype=torch.float32, device=device)


def score_batch(vlm, items, reference: dict[str, list[float]], config, kind_weights: dict[str, float],
                device) -> ScoredBatch:
    """One listwise forward over `items` (a micro-batch of tokenised preference lists); differentiable in the policy
    log-probs and the token KL."""
    from hscr_fast.kernels import fused_linear_logprobs, fused_token_kl
    from hscr_fast.listwise import answer_hidden_states, pack_examples, sum_by_slot
    from hscr_fast.training.data import to_examples
    from hscr_fast.training.reference import reference_tensor

    packed = pack_examples(vlm.embed_tokens, to_examples(vlm, items))
    hidden = answer_hidden_states(vlm, packed)
    policy_logps = sum_by_slot(fused_linear_logprobs(hidden, vlm.lm_head_weight, packed.score_labels), packed)
    weights = sample_weights(items, config, kind_weights, device)
    token_kl = None
    if config.token_kl_weight > 0:
        # Token-level alignment: the reference's hidden states come from the same packed batch with the adapter
        # disabled; the KL is fused from both hidden states and the lm_head (no [N, V] logits).
        with torch.no_grad(), vlm.adapter_disabled():
            reference_hidden = answer_hidden_states(vlm, packed)
        covered = packed.score_slots % packed.num_slots == 0
        if config.token_kl_scope == "marked":
            covered &= packed.score_flags if packed.score_flags is not None else torch.zeros_like(covered)
        per_token = fused_token_kl(hidden, reference_hidden, vlm.lm_head_weight, lam=config.token_kl_lambda,
                                   mask=covered)
        token_kl = sum_by_slot(per_token, packed)[:, 0]
    return ScoredBatch(policy_logps, reference_tensor(reference, items, packed.num_slots, device), packed.valid,
                       weights, token_kl, packed.num_real_tokens)


def batch_loss(scored: ScoredBatch, config) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The preference loss of `config.loss` plus `token_kl_weight` × the (weighted) mean token KL; metrics as
    `mlpo_loss` returns them, with `token_kl` added when it is on."""
    from hscr_fast.losses import lipo_lambda_loss, mlpo_loss, plackett_luce_loss

    listwise = dict(gamma=config.gamma, valid=scored.valid, weight=scored.weights)
    if config.loss == "mlpo":
        loss, metrics = mlpo_loss(scored.policy_logps, scored.ref_logps, explicit=config.explicit,
                                  implicit=config.implicit, **listwise)
    elif config.loss == "plackett-luce":
        loss, metrics = plackett_luce_loss(scored.policy_logps, scored.ref_logps, **listwise)
    elif config.loss == "lipo-lambda":
        loss, metrics = lipo_lambda_loss(scored.policy_logps, scored.ref_logps, **listwise)
    else:  # DPO is MLPO's K = 1 case: y_w against the best dispreferred response, explicit term only
        loss, metrics = mlpo_loss(scored.policy_logps[:, :2], scored.ref_logps[:, :2], gamma=config.gamma,
                                  valid=scored.valid[:, :2], explicit=True, implicit=False, weight=scored.weights)
    if scored.token_kl is not None:
        kl_per_sample = scored.token_kl if scored.weights is None else scored.token_kl * scored.weights
        loss = loss + config.token_kl_weight * kl_per_sample.mean()
        metrics["token_kl"] = kl_per_sample.detach().mean()
        metrics["loss"] = loss.detach()
    return loss, metrics


def concat_scored(batches: list[ScoredBatch]) -> ScoredBatch:
    """Detached batches on the CPU joined into one, response slots padded to the widest (padding is invalid)."""
    width = max(batch.valid.shape[1] for batch in batches)

    def padded(tensor, fill):
        tensor = tensor.detach().float().cpu() if tensor.dtype != torch.bool else tensor.cpu()
        return torch.nn.functional.pad(tensor, (0, width - tensor.shape[1]), value=fill)

    def joined(name):
        # A batch's weights are None when all are 1; token_kl is None in every batch or in none.
        values = [getattr(batch, name) for batch in batches]
        if all(v is None for v in values):
            return None
        return torch.cat([torch.ones(len(batch.valid)) if v is None else v.detach().float().cpu()
                          for v, batch in zip(values, batches)])

    return ScoredBatch(torch.cat([padded(b.policy_logps, 0.0) for b in batches]),
                       torch.cat([padded(b.ref_logps, 0.0) for b in batches]),
                       torch.cat([padded(b.valid, False) for b in batches]),
                       joined("weights"), joined("token_kl"), sum(b.num_real_tokens for b in batches))
