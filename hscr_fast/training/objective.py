"""The training objective of one batch of preference lists, split in two so that held-out evaluation reuses it exactly.

- `score_batch`: the listwise prefix-shared forward of each prompt's responses → sequence log-probs under the policy,
  the cached reference log-probs, the valid-response mask, per-sample weights and (when token-level alignment is on)
  each sample's token KL to the reference. Everything the loss needs, nothing vocabulary-sized.
- `batch_loss`: the preference loss (MLPO, DPO, weighted DPO, Plackett–Luce or LiPO-λ) plus the weighted token KL
  and the preferred response's NLL when they are on, from those tensors alone.

Because `batch_loss` needs only per-sample tensors, held-out evaluation (`hscr_fast.training.heldout`) scores its
batches with
`score_batch`, concatenates them (`concat_scored`) and calls `batch_loss` once on the whole set: the held-out metrics
are exact set-wide values, not averages of batch averages.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from hscr_fast.data.records import DataFormatError
from hscr_fast.runtime.errors import HscrError

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
    chosen_tokens: torch.Tensor | None = None  # [B] tokens of y_w (the NLL's length normalisation), None when off



@dataclass(frozen=True)
class Objective:
    """What one batch's loss is: the preference loss and its settings, the token KL to the reference, the per-kind
    weights. Built once per run (`from_config`); the loop, held-out evaluation and the run identity read it, so no
    other part of the trainer sees the command-line settings."""

    loss: str = "mlpo"  # one of LOSSES
    gamma: float = 0.1  # reward scale γ in r(y) = γ·(log π − log π_ref)
    explicit: bool = True  # MLPO's L_E (y_w against each y_l)
    implicit: bool = True  # MLPO's L_I (each y_l against the worse ones)
    token_kl_weight: float = 0.0  # α of the token KL on the preferred response; 0 = off
    token_kl_lambda: float = 0.5  # λ in λ·KL(ref‖π) + (1−λ)·KL(π‖ref)
    token_kl_scope: str = "preferred"  # "preferred" (the whole response) or "marked" (its <mask>…</mask> spans)
    kind_weights: tuple[tuple[str, float], ...] = ()  # (kind, weight) pairs, sorted
    # α of −log π(y_w)/|y_w|. Preferred and dispreferred responses that differ in one token (stage 1's swaps) are the
    # case where DPO-style losses lower log π(y_w) together with log π(y_l) ("likelihood displacement"); an NLL on y_w,
    # as in RPO (Pang et al. 2024), holds y_w up. Not part of HSCR's Eq. 7; 0 = off.
    chosen_nll_weight: float = 0.0

    @classmethod
    def from_config(cls, config) -> Objective:
        """From the run's settings (`TrainConfig`); a malformed --kind-weight is an `HscrError`."""
        return cls(loss=config.loss, gamma=config.gamma, explicit=config.explicit, implicit=config.implicit,
                   token_kl_weight=config.token_kl_weight, token_kl_lambda=config.token_kl_lambda,
                   token_kl_scope=config.token_kl_scope, chosen_nll_weight=config.chosen_nll_weight,
                   kind_weights=tuple(sorted(parse_kind_weights(config.kind_weight).items())))

    def kind_weight(self, kind: str | None) -> float:
        return dict(self.kind_weights).get(kind, 1.0)

    def run_identity(self) -> dict:
        """The parts a resumed run must share with its checkpoint: which loss and which of its terms, the kind weights,
        the token KL, and the NLL weight when it is on. (Checkpoints from before the MLPO terms were recorded read as
        both on: `hscr_fast.training.loop.RUN_IDENTITY_DEFAULTS`.) The reward scale γ is not part of it: like the
        learning rate, it may change on resume."""
        identity = {"loss": self.loss, "explicit": self.explicit, "implicit": self.implicit,
                    "kind_weights": dict(self.kind_weights),
                    "token_kl": [self.token_kl_weight, self.token_kl_lambda, self.token_kl_scope]}
        if self.chosen_nll_weight:
            identity["chosen_nll_weight"] = self.chosen_nll_weight
        return identity


def parse_kind_weights(entries: list[str] | None) -> dict[str, float]:
    """--kind-weight KIND=W entries → {kind: weight}."""
    weights = {}
    for entry in entries or []:
        kind, sep, value = entry.partition("=")
        try:
            weights[kind] = float(value)
        except ValueError:
            sep = ""
        if not sep or not kind:
            raise HscrError(f"--kind-weight expects KIND=WEIGHT (e.g. image-dispreference=0.1), got {entry!r}")
    return weights

def sample_weights(items, objective: Objective, device) -> torch.Tensor | None:
    """Per-sample loss weights: the record's own `weight` (weighted-dpo: required; the listwise losses: used when
    present; dpo: ignored) times its kind's weight. None when every weight is 1."""
    values = []
    for item in items:
        weight = 1.0
        if objective.loss == "weighted-dpo":
            if item.weight is None:
                raise DataFormatError(f"--loss weighted-dpo needs a 'weight' on every preference record; "
                                 f"id {item.id!r} has none")
            weight = item.weight
        elif objective.loss in LISTWISE_LOSSES and item.weight is not None:
            weight = item.weight
        values.append(weight * objective.kind_weight(item.kind))
    if all(v == 1.0 for v in values):
        return None
    return torch.tensor(values, dtype=torch.float32, device=device)


def whole_head_weight(vlm) -> torch.Tensor:
    """The lm_head weight [V, D] that the fused kernels read directly (the listwise forward never calls lm_head's
    forward, where DeepSpeed would gather it). Under ZeRO-3 the parameter is an empty placeholder and each rank holds
    a shard, so a whole copy is gathered; the head is frozen, so the copy serves the backward pass as well."""
    weight = vlm.lm_head_weight
    if not hasattr(weight, "ds_id"):
        return weight
    import deepspeed

    with deepspeed.zero.GatheredParameters([weight]):
        return weight.detach().clone()


def score_batch(vlm, items, reference: dict[str, list[float]], objective: Objective, device) -> ScoredBatch:
    """One listwise forward over `items` (a micro-batch of tokenised preference lists); differentiable in the policy
    log-probs and the token KL."""
    from hscr_fast.kernels import fused_linear_logprobs, fused_token_kl
    from hscr_fast.listwise import answer_hidden_states, pack_examples, sum_by_slot
    from hscr_fast.training.data import to_examples
    from hscr_fast.training.reference import reference_tensor

    packed = pack_examples(vlm.embed_tokens, to_examples(vlm, items))
    hidden = answer_hidden_states(vlm, packed)
    head = whole_head_weight(vlm)
    policy_logps = sum_by_slot(fused_linear_logprobs(hidden, head, packed.score_labels), packed)
    weights = sample_weights(items, objective, device)
    token_kl = None
    if objective.token_kl_weight > 0:
        # Token-level alignment: the reference's hidden states come from the same packed batch with the adapter
        # disabled; the KL is fused from both hidden states and the lm_head (no [N, V] logits).
        with torch.no_grad(), vlm.adapter_disabled():
            reference_hidden = answer_hidden_states(vlm, packed)
        covered = packed.score_slots % packed.num_slots == 0
        if objective.token_kl_scope == "marked":
            covered &= packed.score_flags if packed.score_flags is not None else torch.zeros_like(covered)
        per_token = fused_token_kl(hidden, reference_hidden, head, lam=objective.token_kl_lambda,
                                   mask=covered)
        token_kl = sum_by_slot(per_token, packed)[:, 0]
    chosen_tokens = None
    if objective.chosen_nll_weight > 0:
        chosen_tokens = torch.bincount(packed.score_slots, minlength=packed.valid.numel()).view(
            packed.valid.shape)[:, 0].to(policy_logps.dtype)
    return ScoredBatch(policy_logps, reference_tensor(reference, items, packed.num_slots, device), packed.valid,
                       weights, token_kl, packed.num_real_tokens, chosen_tokens)


def batch_loss(scored: ScoredBatch, objective: Objective) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The preference loss of `objective.loss` plus `token_kl_weight` × the (weighted) mean token KL; metrics as
    `mlpo_loss` returns them, with `token_kl` added when it is on."""
    from hscr_fast.losses import lipo_lambda_loss, mlpo_loss, plackett_luce_loss

    listwise = dict(gamma=objective.gamma, valid=scored.valid, weight=scored.weights)
    if objective.loss == "mlpo":
        loss, metrics = mlpo_loss(scored.policy_logps, scored.ref_logps, explicit=objective.explicit,
                                  implicit=objective.implicit, **listwise)
    elif objective.loss == "plackett-luce":
        loss, metrics = plackett_luce_loss(scored.policy_logps, scored.ref_logps, **listwise)
    elif objective.loss == "lipo-lambda":
        loss, metrics = lipo_lambda_loss(scored.policy_logps, scored.ref_logps, **listwise)
    else:  # DPO is MLPO's K = 1 case: y_w against the best dispreferred response, explicit term only
        loss, metrics = mlpo_loss(scored.policy_logps[:, :2], scored.ref_logps[:, :2], gamma=objective.gamma,
                                  valid=scored.valid[:, :2], explicit=True, implicit=False, weight=scored.weights)
    if scored.token_kl is not None:
        kl_per_sample = scored.token_kl if scored.weights is None else scored.token_kl * scored.weights
        loss = loss + objective.token_kl_weight * kl_per_sample.mean()
        metrics["token_kl"] = kl_per_sample.detach().mean()
        metrics["loss"] = loss.detach()
    if objective.chosen_nll_weight > 0:
        if scored.chosen_tokens is None:
            raise ValueError("the NLL term needs ScoredBatch.chosen_tokens (score_batch fills it when it is on)")
        nll = -scored.policy_logps[:, 0] / scored.chosen_tokens.clamp(min=1)
        nll = nll if scored.weights is None else nll * scored.weights
        loss = loss + objective.chosen_nll_weight * nll.mean()
        metrics["chosen_nll"] = nll.detach().mean()
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
                       joined("weights"), joined("token_kl"), sum(b.num_real_tokens for b in batches),
                       joined("chosen_tokens"))
