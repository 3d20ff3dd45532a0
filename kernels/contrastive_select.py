"""Fused self-contrastive selection for HSCR stage 1 (docs/method.md, Stage 1 steps 3-5).

For answer position t with label y_t, full-image logits L[t] and image-dropped logits L'[t] (both [V]):

    sensitivity  s_t = log softmax(L[t])[y_t] − log softmax(L'[t])[y_t]          (sensitivity="logprob", default)
                 s_t = L[t, y_t] − L'[t, y_t]                                     (sensitivity="logit")
    positions    the top-`top_n` eligible positions (label != ignore_index and content_mask, and s_t > `min_sensitivity`
                 unless that is None) by descending s_t, ties: lower position first
    replacement  by `rule`, among candidates that are never y_t nor a token of `exclude[t]`; ties: lower token id;
                 -1 when there is no candidate or the position is ignored:
      rule="pdiff" (ascending P_diff, Eq. 3):
                 contrast c_t(v) = (1+β)·L[t, v] − β·L'[t, v],   P_diff,t = softmax(c_t)
                 candidates {v in the top-`num_candidates` tokens of L'[t] (ties: lower token id) :
                             p_drop(v) ≥ α'·max p_drop}  ∪  {v : p_full(v) ≥ α·max p_full}
                 the candidate with the lowest P_diff,t, i.e. the lowest c_t (softmax is monotone within a row)
      rule="deprived" (the image-deprived side amplified, as contrastive decoding does for the full side):
                 candidates {v in the top-`num_candidates` tokens of L'[t] : p_drop(v) ≥ α'·max p_drop} (no full side)
                 the candidate with the highest (1+β)·L'[t, v] − β·L[t, v]
    cuts in log space: L'[t, v] − max L'[t] ≥ log α' and L[t, v] − max L[t] ≥ log α (α = 0 or α' = 0: no cut)

Both rules run the same passes: "deprived" is "pdiff" with the full side switched off (log α = +∞) and the
contrast's coefficients swapped (lowest β·L − (1+β)·L' is highest (1+β)·L' − β·L).
`exclude` [T, E] (−1 = padding) keeps tokens out of the candidates without touching s_t: special tokens, and the
replacements already taken when a caller asks a position for its next-best one.

Note the plausible set is not bounded by 1/α: it is relative to max p_full, so a flat row can pass every token.

The deprived-side cut α' (`alpha_drop`, default None = the same as `alpha`, 0.1) departs from the paper's Stage 1 step 5
as docs/method.md states it, which takes the deprived top-k as it is; `alpha_drop=0` is that literal rule. Why: on a
peaked answer the deprived top-8 tail holds tokens that are implausible with or without the image ("lower", "and" after
"Is there a lesion?"). The full model rejects exactly those hardest, so they have the lowest contrast and the literal
rule picks them: "yes" → "left", "2" → "and", "small" → "and", which are not hallucinations. The intended replacement is
the plausible token the image argues against most; the cut keeps only deprived-side tokens that are plausible without
the image (p_drop(v) ≥ α'·max p_drop), so "yes" → "no". The cut only removes candidates: a position where y_t dominates
both distributions can be left without one (replacement -1).

How it runs: two passes over V per row pair; nothing vocabulary-sized is stored beyond the inputs.
  pass 1 (statistics): max and sum-exp of both rows (online), the label logits, and a running top-k of L' kept as
      packed int64 keys (order-preserving bits of the value in the high word, 0x7FFFFFFF − token id in the low word,
      so one integer max picks the larger logit and, among equal logits, the lower id). It leaves both
      log-normalisers, max L and the top-k of L', which is all pass 2 needs to decide candidacy of any token.
  pass 2 (candidates): candidate mask (top-k of L' by key, both cuts against max L and max L') and a running min
      over packed (contrast, token id) keys.
  The top-n over T positions is a stable sort of T floats.
Triton form (`_triton/contrastive_select.py`): each row's vocabulary is split across programs (grid rows × splits,
so short answers still fill the GPU); a program streams BLOCK_V tiles and writes per-split partials that a few tiny
torch ops merge. From logits, pass 1 reads both rows once (2·V·itemsize per row pair) and pass 2 reads them again.
Torch form: the same passes over tiles of about _TILE_ELEMENTS (blocks of whole rows from logits; vocabulary chunks
from hidden states), with float comparisons on tiles and packed keys only on [T, k] data.
`contrastive_select_from_hidden` computes [T, chunk] fp32 logit chunks from the hidden states and the lm_head, so
[T, V] logits never exist. Recomputing each chunk for pass 2 would cost two more GEMMs, so its torch form keeps, in
pass 1, every token that can still be a candidate (plausible against the running max of L, or in its chunk's top-k
of L': a superset of the final candidates) with its L, L' and contrast, and decides candidacy among those after
pass 1; only when they exceed a quarter of a chunk's elements (flat rows) does it recompute the chunks for pass 2.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterator, NamedTuple

import torch

from ._common import check_head_inputs, check_labels, linear_logits_fp32, resolve_backend

INT64_MIN = -(2**63)
INT64_MAX = 2**63 - 1
_TILE_ELEMENTS = 2**21  # elements of one [T, chunk] fp32 tile in the torch form / from-hidden chunks
_KEPT_PER_CHUNK_ELEMENTS = 4  # from hidden: pass 1 keeps at most one possible candidate per this many chunk elements

REPLACEMENT_RULES = ("pdiff", "deprived")


@dataclass
class ContrastiveSelection:
    """Stage-1 selection for one sequence of T answer positions."""

    sensitivity: torch.Tensor  # float32 [T]; s_t, -inf where ignored or not content
    sensitive_positions: torch.Tensor  # int64 [n], n = min(top_n, eligible); descending s_t, ties: lower position
    replacement: torch.Tensor  # int64 [T]; replacement token per position, -1 where ignored or no candidate
    logprob_full: torch.Tensor  # float32 [T]; log p(y_t | full image), 0 where ignored
    logprob_drop: torch.Tensor  # float32 [T]; log p(y_t | dropped image), 0 where ignored


class _Options(NamedTuple):
    top_n: int
    num_candidates: int
    sensitivity: str
    ignore_index: int
    log_alpha: float  # full-side cut; +inf for rule "deprived" (no full side)
    log_alpha_drop: float  # deprived-side cut; -inf: none (the paper's literal rule)
    coef_full: float  # the replacement minimises coef_full·L − coef_drop·L': 1 + beta ("pdiff") or beta ("deprived")
    coef_drop: float  # beta ("pdiff") or 1 + beta ("deprived")
    min_sensitivity: float | None  # positions need s_t > this; None: literal top-n


class _Stats(NamedTuple):
    """Per-row results of pass 1: what pass 2 and the final assembly need."""

    max_full: torch.Tensor  # [T] max_v L[t, v]
    max_drop: torch.Tensor  # [T] max_v L'[t, v]
    lse_full: torch.Tensor  # [T]
    lse_drop: torch.Tensor  # [T]
    kth_key: torch.Tensor  # [T] int64, k-th largest (L', id) key; INT64_MIN when k >= V, INT64_MAX when k = 0
    # [T, k] the top-k token ids of L' that pass the deprived-side cut, -1 for those that do not (for the torch form);
    # None when k >= V
    top_ids: torch.Tensor | None


class _Partial(NamedTuple):
    """Pass-1 partials of one vocabulary range, S splits of it: [T, S] each, top keys [T, S·k]."""

    max_full: torch.Tensor
    sumexp_full: torch.Tensor  # Σ exp(L − max_full) over the range
    max_drop: torch.Tensor
    sumexp_drop: torch.Tensor
    top_keys: torch.Tensor


# --------------------------------------------------------------------------------------------------------------------
# Torch form (same passes, on [T, chunk] fp32 tiles)


def _ordered_bits_torch(values: torch.Tensor) -> torch.Tensor:
    bits = values.masked_fill(values == 0, 0.0).view(torch.int32)
    return bits ^ ((bits >> 31) & 0x7FFFFFFF)


def _keys_by_value_desc_torch(values: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    return (_ordered_bits_torch(values).long() << 32) | (0x7FFFFFFF - ids)


def _keys_by_value_asc_torch(values: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    return (_ordered_bits_torch(values).long() << 32) | ids


def _values_of_keys_torch(keys: torch.Tensor) -> torch.Tensor:
    """The fp32 values packed in the high words of keys (the order-preserving map is its own inverse)."""
    bits = (keys >> 32).int()
    return (bits ^ ((bits >> 31) & 0x7FFFFFFF)).view(torch.float32)


def _max_and_sumexp(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    row_max = x.amax(dim=1)
    shift = torch.where(row_max == float("-inf"), 0.0, row_max)
    return row_max, (x - shift[:, None]).exp_().sum(dim=1)


# The torch form touches each [T, chunk] tile as few times as it can: packed integer keys only on [T, k] data (bit
# operations over whole tiles are several times slower on CPU than float ones), top-k membership and the label
# exclusion by scatter, the contrast in two passes.


def _stats_torch(full, drop, vocab_offset, k):
    rows, cols = full.shape
    max_full, sumexp_full = _max_and_sumexp(full)
    max_drop, sumexp_drop = _max_and_sumexp(drop)
    top_keys = torch.full((rows, k), INT64_MIN, dtype=torch.int64, device=full.device)
    if k:
        kept = min(k, cols)
        # one extra value shows whether the k-th is tied with the next: torch.topk breaks such ties arbitrarily,
        # so those rows are redone with exact (value, lower id) keys
        values, index = drop.topk(min(k + 1, cols), dim=1)
        keys = _keys_by_value_desc_torch(values[:, :kept], index[:, :kept] + vocab_offset)
        if kept < values.shape[1]:
            tied = (values[:, kept] == values[:, kept - 1]).nonzero().squeeze(1)
            if tied.numel():
                ids = torch.arange(vocab_offset, vocab_offset + cols, device=full.device)
                keys[tied] = _keys_by_value_desc_torch(drop[tied], ids).topk(kept, dim=1).values
        top_keys[:, :kept] = keys
    return _Partial(max_full[:, None], sumexp_full[:, None], max_drop[:, None], sumexp_drop[:, None], top_keys)


def _scatter_tokens(tile: torch.Tensor, tokens: torch.Tensor, vocab_offset: int, value: bool) -> None:
    """tile[r, v − vocab_offset] = value for the token ids `tokens` [rows, m] inside this chunk. `tile` has one spare
    last column, where the ids outside the chunk land."""
    cols = tile.shape[1] - 1
    local = tokens - vocab_offset
    tile.scatter_(1, torch.where((local >= 0) & (local < cols), local, cols), value)


def _contrast_torch(full, drop, options):
    # one op for both torch candidate forms, so that a token's contrast is the same float in either
    return torch.add(options.coef_full * full, drop, alpha=-options.coef_drop)


def _candidates_torch(full, drop, vocab_offset, labels, exclude, stats, options):
    rows, cols = full.shape
    candidate = torch.empty(rows, cols + 1, dtype=torch.bool, device=full.device)
    torch.ge(full, (stats.max_full + options.log_alpha)[:, None], out=candidate[:, :cols])  # p >= alpha max p
    if stats.top_ids is None:  # k >= V: every token is in the top-k, so the deprived side is the cut alone
        candidate[:, :cols] |= (drop - stats.max_drop[:, None]) >= options.log_alpha_drop
    else:  # the top-k ids that passed the cut (-1, outside every chunk, for those that did not)
        _scatter_tokens(candidate, stats.top_ids, vocab_offset, True)
    _scatter_tokens(candidate, labels[:, None], vocab_offset, False)
    if exclude is not None:
        _scatter_tokens(candidate, exclude, vocab_offset, False)
    contrast = _contrast_torch(full, drop, options).masked_fill_(~candidate[:, :cols], float("inf"))
    best_value, best_index = contrast.min(dim=1)  # the first of equal minima: the lowest token id
    best_key = _keys_by_value_asc_torch(best_value, best_index + vocab_offset)
    # finite logits give finite contrasts: +inf is the minimum only where nothing was a candidate
    return torch.where(best_value == float("inf"), INT64_MAX, best_key)


class _KeptTokens:
    """Pass-1 record, torch form, of every token that can still turn out a candidate, so that pass 2 (which from
    hidden states recomputes each chunk's logits: two more GEMMs) can be skipped.

    A token can be a candidate only if, when its chunk is seen, it is plausible against the running max of L (the
    final max is at least as large, so the final plausible set is a subset) or in its chunk's top-k of L' (the final
    top-k is a subset of the chunks' top-k). Those tokens are kept as (row·V + id, L, L', contrast), the contrast by
    pass 2's elementwise op (`_contrast_torch`) on the same floats, so the choice is the same float for float. After
    pass 1, pass 2's tests with the final statistics pick the candidates among them. When more than `budget` are
    kept (flat rows pass nearly every token) the record is dropped and pass 2 runs as before.
    """

    def __init__(self, vocab: int, budget: int, device: torch.device):
        # Allocated once, before the first tile: records grown chunk by chunk would sit between the freed tiles on
        # the CPU heap and fragment it (peak memory up to 3x). Only the pages written become resident.
        self.vocab, self.count = vocab, 0
        self.index = torch.empty(budget, dtype=torch.int64, device=device)  # row·V + token id
        self.values = torch.empty(3, budget, dtype=torch.float32, device=device)  # L, L', contrast
        self.overflowed = False

    def add(self, full, drop, vocab_offset, chunk_top_keys, running_max_full, options) -> None:
        if self.overflowed:
            return
        rows, cols = full.shape
        kept = torch.empty(rows, cols + 1, dtype=torch.bool, device=full.device)
        torch.ge(full, (running_max_full + options.log_alpha)[:, None], out=kept[:, :cols])
        _scatter_tokens(kept, 0x7FFFFFFF - (chunk_top_keys & 0xFFFFFFFF), vocab_offset, True)
        flat = kept[:, :cols].flatten().nonzero().squeeze(1)
        start, stop = self.count, self.count + flat.numel()
        if stop > self.index.numel():
            self.overflowed = True
            del self.index, self.values
            return
        row, col = flat // cols, flat % cols
        self.index[start:stop] = row * self.vocab + col + vocab_offset
        full_kept, drop_kept = self.values[0, start:stop], self.values[1, start:stop]
        torch.index_select(full.flatten(), 0, flat, out=full_kept)
        torch.index_select(drop.flatten(), 0, flat, out=drop_kept)
        self.values[2, start:stop] = _contrast_torch(full_kept, drop_kept, options)
        self.count = stop

    def best_keys(self, labels: torch.Tensor, exclude, stats: _Stats, options: _Options) -> torch.Tensor:
        """[T] ascending (contrast, id) key of each row's best candidate, INT64_MAX where none: pass 2's result."""
        index = self.index[:self.count]
        full, drop, contrast = self.values[:, :self.count]
        row, ids = index // self.vocab, index % self.vocab
        # pass 2's tests with the final statistics (the deprived one as the Triton kernel writes it)
        plausible = full >= (stats.max_full + options.log_alpha)[row]
        deprived = ((_keys_by_value_desc_torch(drop, ids) >= stats.kth_key[row])
                    & ((drop - stats.max_drop[row]) >= options.log_alpha_drop))
        candidate = (plausible | deprived) & (ids != labels[row])
        if exclude is not None:
            candidate &= (ids[:, None] != exclude[row]).all(dim=1)
        keys = torch.where(candidate, _keys_by_value_asc_torch(contrast, ids), INT64_MAX)
        best = torch.full((labels.shape[0],), INT64_MAX, dtype=torch.int64, device=labels.device)
        return best.scatter_reduce_(0, row, keys, "amin")


# --------------------------------------------------------------------------------------------------------------------
# Shared driver


def _combine(maxima: torch.Tensor, sumexps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[T, S] partial (max, Σ exp(x − max)) pairs -> one [T, 1] pair (online-softmax merge; -inf rows stay -inf)."""
    row_max = maxima.amax(dim=1, keepdim=True)
    shift = torch.where(row_max == float("-inf"), 0.0, row_max)
    return row_max, (sumexps * (maxima - shift).exp()).sum(dim=1, keepdim=True)


def _fold(running: _Partial | None, part: _Partial, k: int) -> _Partial:
    """Merge a chunk's partials into the running ones, so that only [T, k] keys are kept however many chunks."""
    if running is not None:
        part = _Partial(*(torch.cat([old, new], dim=1) for old, new in zip(running, part)))
    # every partial holds k keys per row (padded with INT64_MIN), so there are always at least k to choose from
    top_keys = part.top_keys.topk(k, dim=1).values if k else part.top_keys
    return _Partial(*_combine(part.max_full, part.sumexp_full), *_combine(part.max_drop, part.sumexp_drop), top_keys)


def _finish_stats(running: _Partial, all_in_top_k: bool, log_alpha_drop: float) -> _Stats:
    def lse(row_max, sumexp):
        return torch.where(row_max == float("-inf"), 0.0, row_max).squeeze(1) + sumexp.squeeze(1).log()

    top_keys = running.top_keys
    if top_keys.shape[1]:
        kth_key = top_keys[:, -1].contiguous()  # topk sorts descending: the last is the k-th largest
    else:  # k = 0 selects nothing (INT64_MAX: no key reaches it); k >= V selects everything (INT64_MIN)
        kth_key = torch.full(top_keys.shape[:1], INT64_MIN if all_in_top_k else INT64_MAX, dtype=torch.int64,
                             device=top_keys.device)
    max_drop = running.max_drop.squeeze(1).contiguous()
    top_ids = None
    if not all_in_top_k:
        # the same fp32 test as the Triton kernel's, on the [T, k] top values: L' − max L' ≥ log α'
        passes = (_values_of_keys_torch(top_keys) - max_drop[:, None]) >= log_alpha_drop
        top_ids = torch.where(passes, 0x7FFFFFFF - (top_keys & 0xFFFFFFFF), -1)
    return _Stats(running.max_full.squeeze(1).contiguous(), max_drop, lse(running.max_full, running.sumexp_full),
                  lse(running.max_drop, running.sumexp_drop), kth_key, top_ids)


def _gather_label_logits(chunk: torch.Tensor, vocab_offset: int, labels: torch.Tensor, out: torch.Tensor) -> None:
    in_chunk = (labels >= vocab_offset) & (labels < vocab_offset + chunk.shape[1])
    index = (labels - vocab_offset).clamp(0, chunk.shape[1] - 1)[:, None]
    out.copy_(torch.where(in_chunk, chunk.gather(1, index).squeeze(1).float(), out))


Chunks = Callable[[], Iterator[tuple[int, torch.Tensor, torch.Tensor]]]


class _RowScores(NamedTuple):
    label_full: torch.Tensor  # [T] L[t, y_t] (0 where ignored)
    label_drop: torch.Tensor
    lse_full: torch.Tensor  # [T]
    lse_drop: torch.Tensor
    best_key: torch.Tensor  # [T] int64 ascending (contrast, id) key of the replacement; INT64_MAX: no candidate


@torch.no_grad()
def _score_rows(chunks: Chunks, vocab: int, labels: torch.Tensor, exclude, options: _Options, backend: str,
                keep_budget: int = 0) -> _RowScores:
    """Both passes over the (vocab_offset, L chunk, L' chunk) triples that `chunks()` yields, for the rows of labels.

    keep_budget > 0 (torch form, chunks costly to recompute): keep up to that many possible candidates in pass 1
    (`_KeptTokens`) and skip pass 2 when they fit.
    """
    if backend == "triton":
        from ._triton.contrastive_select import candidates_pass, stats_pass  # triton on this path only (see _triton)
    else:
        stats_pass, candidates_pass = _stats_torch, _candidates_torch
    rows, device = labels.shape[0], labels.device
    label_full = torch.zeros(rows, dtype=torch.float32, device=device)
    label_drop = torch.zeros(rows, dtype=torch.float32, device=device)
    # with k >= V every token is in the top-k: nothing to track, and the threshold key INT64_MIN lets every token pass
    tracked_k = 0 if options.num_candidates >= vocab else options.num_candidates
    # the record needs a plausibility cut (alpha > 0) and a deprived side that is a top-k (k < V)
    keeping = backend == "torch" and keep_budget > 0 and math.isfinite(options.log_alpha) and tracked_k > 0
    kept = _KeptTokens(vocab, keep_budget, device) if keeping else None
    running = None
    for vocab_offset, full, drop in chunks():
        part = _Partial(*stats_pass(full, drop, vocab_offset, tracked_k))
        running = _fold(running, part, tracked_k)
        if kept is not None:
            kept.add(full, drop, vocab_offset, part.top_keys, running.max_full.squeeze(1), options)
        _gather_label_logits(full, vocab_offset, labels, label_full)
        _gather_label_logits(drop, vocab_offset, labels, label_drop)
    stats = _finish_stats(running, all_in_top_k=tracked_k != options.num_candidates,
                          log_alpha_drop=options.log_alpha_drop)
    if kept is not None and not kept.overflowed:
        best_key = kept.best_keys(labels, exclude, stats, options)
    else:
        best_key = torch.full((rows,), INT64_MAX, dtype=torch.int64, device=device)
        for vocab_offset, full, drop in chunks():
            best_key = torch.minimum(best_key, candidates_pass(full, drop, vocab_offset, labels, exclude, stats,
                                                               options))
    return _RowScores(label_full, label_drop, stats.lse_full, stats.lse_drop, best_key)


def _assemble(scores: _RowScores, labels: torch.Tensor, content_mask, options: _Options) -> ContrastiveSelection:
    valid = labels != options.ignore_index
    logprob_full = torch.where(valid, scores.label_full - scores.lse_full, 0.0)
    logprob_drop = torch.where(valid, scores.label_drop - scores.lse_drop, 0.0)
    if options.sensitivity == "logprob":
        score = logprob_full - logprob_drop
    else:
        score = scores.label_full - scores.label_drop
    eligible = valid if content_mask is None else valid & content_mask
    sensitivity = torch.where(eligible, score, float("-inf"))
    selectable = eligible if options.min_sensitivity is None else eligible & (score > options.min_sensitivity)
    count = min(options.top_n, int(selectable.sum()))
    # stable descending sort: equal sensitivities keep position order, so the lower position comes first; the
    # selectable ones are the largest (a threshold on s_t), so they lead the order
    sensitive_positions = torch.sort(torch.where(selectable, score, float("-inf")), descending=True,
                                     stable=True).indices[:count]
    # the low word of an ascending key is the token id
    replacement = torch.where(valid & (scores.best_key != INT64_MAX), scores.best_key & 0xFFFFFFFF, -1)
    return ContrastiveSelection(sensitivity, sensitive_positions, replacement, logprob_full, logprob_drop)


def _log_cut(alpha: float) -> float:
    return math.log(alpha) if alpha > 0 else float("-inf")


def _check_options(rows, beta, top_n, alpha, alpha_drop, num_candidates, sensitivity, content_mask, ignore_index,
                   device, op, *, vocab: int, labels: torch.Tensor, rule: str = "pdiff", exclude=None,
                   min_sensitivity: float | None = None) -> "_Options":
    """Checks what both entry points share (vocabulary, labels, options) and returns the options in kernel form."""
    if vocab == 0:
        raise ValueError(f"{op}: the vocabulary is empty")
    check_labels(labels, rows, vocab, ignore_index, op=op)
    if not math.isfinite(beta):
        raise ValueError(f"{op}: beta must be a finite number, got {beta}")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"{op}: alpha is the plausibility cut p(v) >= alpha * max p and must lie in [0, 1], "
                         f"got {alpha}")
    if alpha_drop is None:
        alpha_drop = alpha
    if not 0.0 <= alpha_drop <= 1.0:
        raise ValueError(f"{op}: alpha_drop is the deprived-side cut p_drop(v) >= alpha_drop * max p_drop and must "
                         f"lie in [0, 1] (0: no cut, the paper's literal rule; None: the same as alpha), "
                         f"got {alpha_drop}")
    if top_n < 0 or num_candidates < 0:
        raise ValueError(f"{op}: top_n and num_candidates must be >= 0, got {top_n} and {num_candidates}")
    if sensitivity not in ("logprob", "logit"):
        raise ValueError(f"{op}: sensitivity must be 'logprob' or 'logit', got {sensitivity!r}")
    if content_mask is not None:
        if content_mask.dtype != torch.bool or content_mask.shape != (rows,) or content_mask.device != device:
            raise ValueError(f"{op}: content_mask must be a bool tensor of shape [{rows}] on {device}, got "
                             f"{content_mask.dtype} {list(content_mask.shape)} on {content_mask.device}")
    if rule not in REPLACEMENT_RULES:
        raise ValueError(f"{op}: rule must be one of {REPLACEMENT_RULES}, got {rule!r}")
    if min_sensitivity is not None and not math.isfinite(min_sensitivity):
        raise ValueError(f"{op}: min_sensitivity must be a finite number or None (literal top-n), "
                         f"got {min_sensitivity}")
    if exclude is not None:
        if exclude.dtype != torch.int64 or exclude.dim() != 2 or exclude.shape[0] != rows or exclude.device != device:
            raise ValueError(f"{op}: exclude must be an int64 tensor [{rows}, E] on {device}, got {exclude.dtype} "
                             f"{list(exclude.shape)} on {exclude.device}")
        if exclude.numel() and (int(exclude.min()) < -1 or int(exclude.max()) >= vocab):
            raise ValueError(f"{op}: exclude holds token ids in [0, {vocab}) or -1 (padding), got values from "
                             f"{int(exclude.min())} to {int(exclude.max())}")
    if rule == "deprived":  # the deprived side alone, the contrast turned round
        return _Options(int(top_n), int(num_candidates), sensitivity, ignore_index, math.inf, _log_cut(alpha_drop),
                        float(beta), 1.0 + float(beta), min_sensitivity)
    return _Options(int(top_n), int(num_candidates), sensitivity, ignore_index, _log_cut(alpha), _log_cut(alpha_drop),
                    1.0 + float(beta), float(beta), min_sensitivity)


def _empty_selection(device) -> ContrastiveSelection:
    empty_float = torch.empty(0, dtype=torch.float32, device=device)
    empty_long = torch.empty(0, dtype=torch.int64, device=device)
    return ContrastiveSelection(empty_float, empty_long, empty_long.clone(), empty_float.clone(), empty_float.clone())


def _default_chunk_width(rows: int, vocab: int) -> int:
    return max(1, min(vocab, _TILE_ELEMENTS // max(rows, 1)))


def contrastive_select(
    logits_full: torch.Tensor,
    logits_drop: torch.Tensor,
    labels: torch.Tensor,
    *,
    beta: float = 0.9,
    top_n: int = 10,
    alpha: float = 0.1,
    alpha_drop: float | None = None,
    num_candidates: int = 8,
    sensitivity: str = "logprob",
    content_mask: torch.Tensor | None = None,
    ignore_index: int = -100,
    rule: str = "pdiff",
    exclude: torch.Tensor | None = None,
    min_sensitivity: float | None = None,
    backend: str = "auto",
    chunk_size: int | None = None,
) -> ContrastiveSelection:
    """Sensitivities, sensitive positions and replacement tokens from full- and dropped-image logits [T, V].

    The semantics are the module docstring's. Candidates at position t: the top-`num_candidates` tokens of L'[t]
    that pass the deprived-side cut p_drop(v) ≥ alpha_drop·max p_drop, together with every v with
    p_full(v) ≥ alpha·max p_full, minus y_t; the replacement is the candidate with the lowest P_diff (ties: lowest
    id). `alpha_drop=None` (default) means the same as `alpha` (0.1); `alpha_drop=0` is the paper's literal rule,
    which on peaked rows picks tokens implausible even without the image (the module docstring has the example).
    `rule="deprived"` takes instead the highest (1+β)·L' − β·L among the top-`num_candidates` tokens of L' with
    p_drop ≥ alpha_drop·max p_drop (`alpha` then plays no part). `exclude` [T, E] int64 (−1: padding) names tokens
    never to choose at row t (special tokens; replacements already taken). `min_sensitivity`: positions need s_t
    above it (0.0: only tokens the image supports); None takes the top-n whatever their sign. Logits may be
    bf16/fp16/fp32 (fp64 is read as fp32); all arithmetic is fp32. `chunk_size`: vocabulary columns per tile in the
    torch form (default: whole rows, in blocks of about 2M elements).
    """
    op = "contrastive_select"
    if logits_full.dim() != 2 or logits_full.shape != logits_drop.shape:
        raise ValueError(f"{op}: logits_full and logits_drop must both be [T, V], got "
                         f"{list(logits_full.shape)} and {list(logits_drop.shape)}")
    if not logits_full.is_floating_point() or not logits_drop.is_floating_point():
        raise TypeError(f"{op}: logits must be floating point, got {logits_full.dtype} and {logits_drop.dtype}")
    if logits_drop.device != logits_full.device or labels.device != logits_full.device:
        raise ValueError(f"{op}: logits_full, logits_drop and labels must be on one device")
    rows, vocab = logits_full.shape
    options = _check_options(rows, beta, top_n, alpha, alpha_drop, num_candidates, sensitivity, content_mask,
                             ignore_index, logits_full.device, op, vocab=vocab, labels=labels, rule=rule,
                             exclude=exclude, min_sensitivity=min_sensitivity)
    backend = resolve_backend(backend, logits_full.device)
    if rows == 0:
        return _empty_selection(logits_full.device)

    labels = labels.long().contiguous()
    if backend == "triton":
        # the kernels read the inputs where they are (any float dtype), splitting V across programs
        full = logits_full if logits_full.stride(1) == 1 else logits_full.contiguous()
        drop = logits_drop if logits_drop.stride(1) == 1 else logits_drop.contiguous()
        exclude = None if exclude is None else exclude.contiguous()
        return _assemble(_score_rows(lambda: iter([(0, full, drop)]), vocab, labels, exclude, options, backend),
                         labels, content_mask, options)

    # torch form: blocks of whole rows (contiguous, nothing to merge across the vocabulary) unless chunk_size asks
    # for vocabulary chunks; either way tiles of about _TILE_ELEMENTS
    width = min(vocab, chunk_size or vocab)
    block = max(1, _TILE_ELEMENTS // width)
    scores = []
    for start in range(0, rows, block):
        rows_full, rows_drop = logits_full[start:start + block], logits_drop[start:start + block]

        def chunks(rows_full=rows_full, rows_drop=rows_drop):  # this block's rows, bound now
            for offset in range(0, vocab, width):
                yield offset, rows_full[:, offset:offset + width].float(), rows_drop[:, offset:offset + width].float()

        scores.append(_score_rows(chunks, vocab, labels[start:start + block],
                                  None if exclude is None else exclude[start:start + block], options, backend))
    return _assemble(_RowScores(*(torch.cat(parts) for parts in zip(*scores))), labels, content_mask, options)


def contrastive_select_from_hidden(
    hidden_full: torch.Tensor,
    hidden_drop: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    beta: float = 0.9,
    top_n: int = 10,
    alpha: float = 0.1,
    alpha_drop: float | None = None,
    num_candidates: int = 8,
    sensitivity: str = "logprob",
    content_mask: torch.Tensor | None = None,
    ignore_index: int = -100,
    rule: str = "pdiff",
    exclude: torch.Tensor | None = None,
    min_sensitivity: float | None = None,
    backend: str = "auto",
    chunk_size: int | None = None,
) -> ContrastiveSelection:
    """`contrastive_select` on L = hidden_full @ weight.T and L' = hidden_drop @ weight.T without forming [T, V].

    hidden_full, hidden_drop [T, D] and weight [V, D] (the lm_head, no bias) share one dtype. Each pass computes
    [T, chunk_size] fp32 logit chunks (default: about 2M elements) and discards them after use. The options, the
    candidate rule included (`alpha_drop`: None = `alpha`, 0 = the paper's literal rule), are `contrastive_select`'s.
    """
    op = "contrastive_select_from_hidden"
    check_head_inputs(op, {"hidden_full": hidden_full, "hidden_drop": hidden_drop}, weight, rows="T",
                      on_same_device={"labels": labels})
    rows, vocab = hidden_full.shape[0], weight.shape[0]
    options = _check_options(rows, beta, top_n, alpha, alpha_drop, num_candidates, sensitivity, content_mask,
                             ignore_index, weight.device, op, vocab=vocab, labels=labels, rule=rule,
                             exclude=exclude, min_sensitivity=min_sensitivity)
    backend = resolve_backend(backend, weight.device)
    if rows == 0:
        return _empty_selection(weight.device)
    width = min(vocab, chunk_size or _default_chunk_width(rows, vocab))

    def chunks():
        for start in range(0, vocab, width):
            head = weight[start:start + width]
            yield (start, linear_logits_fp32(hidden_full, head).float(), linear_logits_fp32(hidden_drop, head).float())

    if width == vocab:  # one chunk within the tile budget (short answers): compute it once for both passes
        single_chunk = list(chunks())
        chunks = lambda: iter(single_chunk)  # noqa: E731

    labels = labels.long().contiguous()
    # recomputed chunks (two GEMMs each) make pass 2 costly: keep pass 1's possible candidates instead, up to a
    # quarter of a chunk's elements (20 bytes each: about 1.25 chunks of fp32 logits)
    keep_budget = rows * width // _KEPT_PER_CHUNK_ELEMENTS if width < vocab else 0
    exclude = None if exclude is None else exclude.contiguous()
    return _assemble(_score_rows(chunks, vocab, labels, exclude, options, backend, keep_budget), labels, content_mask,
                     options)
