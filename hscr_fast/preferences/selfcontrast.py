"""Stage 1 of HSCR: token-level self-contrastive rewarding (paper §3.1; docs/method.md has the readings below and
the measurements behind their defaults).

For a batch of samples (image, question, ground-truth answer y_w):

1. the vision tower runs once; each sample's image is also deprived by `perturbation` at `drop_ratio`, seeded per
   (seed, sample id): visual-token dropout after the projector (default; `hscr_fast.models.dropout`, mode `remove`
   or `mask`), or pixel-, patch- or latent-level masking in the vision encoder (`hscr_fast.models.perturbation`);
2. two teacher-forced forwards score y_w, one per condition (full image, deprived image), each ONE packed forward for
   the whole batch (`hscr_fast.listwise`, one response per prompt): only the answer positions' final hidden states are
   kept, never [T, V] logits;
3. per sample, `hscr_fast.kernels.contrastive_select_from_hidden` computes s_t, the contrast, the sensitive
   positions and each position's replacement straight from the hidden states and the lm_head weight;
4. graded variants: variant m of M replaces the ⌈m·n/M⌉ most sensitive positions (n = sensitive positions found).
   When that gives fewer than M distinct variants (short answers: n < M), the next-best replacements at the sensitive
   positions (`num_alternatives` each, asked of the kernel with the better ones excluded) supply single-swap
   variants, 2nd-best at every position first, then 3rd-best, until there are M.

Content tokens. Special tokens (BOS, EOS, pad, ...) are never sensitive and never replacements. Tokens whose text has
no letter or digit (whitespace, punctuation, partial UTF-8 bytes) are not sensitive unless `include_punctuation=True`.

Choices made here that the paper leaves open:
- Sensitive positions are image-supported: only content tokens with s_t > `min_sensitivity` (default 0: the image
  makes y_t more likely) compete, top-n among them. `min_sensitivity=None` is the literal top-n, which on answers
  shorter than n takes every content token, including ones the image argues against. Positions without a
  replacement candidate under the rule are passed over.
- Replacement (`replacement`; the kernel's `rule` and `alpha_drop`):
  * `pdiff-ascending`: the lowest P_diff among the image-deprived top-`num_candidates` tokens and the tokens
    plausible with the image (p_full ≥ `alpha`·max p_full), minus y_t: the paper's "ascending P_diff" as written;
    on peaked rows the lowest contrast is a token the full model rejects hardest, often junk ("yes" → "left");
  * `pdiff-ascending-cut`: the same, keeping on the deprived side only tokens also plausible without the image
    (p_drop ≥ `alpha`·max p_drop);
  * `deprived-contrast`: the highest (1+β)·L' − β·L among the image-deprived top-`num_candidates` tokens that are
    plausible without the image (p_drop ≥ `alpha`·max p_drop): what the image-deprived model prefers most over the
    full one (contrastive decoding with the roles of the two conditions swapped);
  * `deprived-contrast-uncut`: the same over the whole deprived top-`num_candidates`, so that a position where the
    deprived model is as sure of y_t as the full one (a normal scan still looks normal with 30% of its tokens) still
    gets its most likely alternative.
- Modes of Eq. 4:
  * `parallel`: one pass. The replacements are all chosen from the scores of y_w itself, and variant m
    applies the first ⌈m·n/M⌉ of them.
  * `sequential` (Eq. 4 read literally): the first pass on y_w fixes n (as in parallel) and makes the first
    replacement (its most sensitive position). Each later step re-scores the *current* modified answer under both
    conditions (two batched forwards) and replaces the most sensitive position not yet replaced, with the replacement
    chosen in that pass; the recorded s_t is the one from the pass that chose the position. After n steps, variant m
    is the answer after ⌈m·n/M⌉ replacements. Cost: n + 1 pairs of forwards instead of one. Next-best alternatives
    come from the pass on y_w in both modes.
- Repeated variants (⌈m·n/M⌉ repeats when n < M, or an alternative that equals another variant) are collapsed by
  Stage 2.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from hscr_fast.listwise import ListwiseExample, answer_hidden_states, pack_examples
from hscr_fast.models.dropout import VisualDropout, visual_dropout
from hscr_fast.models.perturbation import ImagePerturbation, check_perturbation
from hscr_fast.models.prompting import PromptTokens
from hscr_fast.preferences.config import CONTRAST_MODES, SelfContrastConfig

# replacement rule -> the kernel's (rule, alpha_drop); alpha_drop None: the same as alpha
REPLACEMENT_RULES = {
    "pdiff-ascending": ("pdiff", 0.0),
    "pdiff-ascending-cut": ("pdiff", None),
    "deprived-contrast": ("deprived", None),
    "deprived-contrast-uncut": ("deprived", 0.0),
}


@dataclass
class PreparedSample:
    """A sample tokenised for scoring: the prompt around its image and y_w's tokens (EOS included)."""

    sample_id: str
    prompt: PromptTokens
    answer_ids: list[int]


@dataclass(frozen=True)
class SensitiveToken:
    """A replaced position of y_w: its index in `answer_ids`, the original and replacement token, s_t, and the
    next-best replacements there (best first; empty unless the answer needed them)."""

    position: int
    token_id: int
    replacement_id: int
    sensitivity: float
    alternative_ids: tuple[int, ...] = ()


@dataclass
class Variant:
    """One dispreferred candidate: y_w with `replaced_positions` (in replacement order) swapped. `alternative` is 0
    for a cumulative variant and r >= 1 for a single swap by the (r+1)-th best replacement."""

    token_ids: list[int]
    replaced_positions: list[int]
    text: str
    alternative: int = 0


@dataclass
class SelfContrastResult:
    """Stage 1 output for one sample. `sensitive` is in replacement order (descending s_t in parallel mode);
    `variants[m-1]` (m <= M) replaces the first ⌈m·n/M⌉ of them; next-best single swaps follow when those are fewer
    than M distinct. Both are empty when no position is sensitive. `num_content`: y_w's content tokens."""

    sample_id: str
    answer_ids: list[int]
    sensitive: list[SensitiveToken] = field(default_factory=list)
    variants: list[Variant] = field(default_factory=list)
    num_content: int = 0


def graded_counts(num_sensitive: int, num_variants: int) -> list[int]:
    """How many positions variant m = 1..M replaces: ⌈m·n/M⌉ (Eq. 4), in exact integer arithmetic."""
    return [-(-m * num_sensitive // num_variants) for m in range(1, num_variants + 1)]


class ContentTokens:
    """Which token ids can be sensitive: never special tokens; by default only tokens whose text has a letter or digit.

    The decision is per token id (cached), from the token decoded on its own, so it works for SentencePiece ("▁left")
    and byte-level BPE ("Ġleft") vocabularies alike.
    """

    def __init__(self, tokenizer, *, include_punctuation: bool = False):
        self.tokenizer = tokenizer
        self.include_punctuation = include_punctuation
        self._special = set(tokenizer.all_special_ids)
        self._cache: dict[int, bool] = {}

    def is_content(self, token_id: int) -> bool:
        if token_id not in self._cache:
            if token_id in self._special:
                self._cache[token_id] = False
            elif self.include_punctuation:
                self._cache[token_id] = True
            else:
                text = self.tokenizer.decode([token_id])
                self._cache[token_id] = any(character.isalnum() for character in text)
        return self._cache[token_id]

    def mask(self, token_ids: list[int]) -> list[bool]:
        return [self.is_content(token) for token in token_ids]


def decode_answer(tokenizer, token_ids: list[int]) -> str:
    """Answer tokens → text as a response is stored: special tokens (EOS, or a special replacement) dropped."""
    return tokenizer.decode(token_ids, skip_special_tokens=True).strip()


def render_marked(tokenizer, token_ids: list[int], marked_positions, *, open_mark: str = "[",
                  close_mark: str = "]") -> str:
    """The answer's text with the tokens at `marked_positions` wrapped in marks, for people (`--show`).

    Each token's text is what it adds to the incremental decoding, so word boundaries stay as the tokenizer puts them;
    a leading space stays outside the marks. Special tokens show as their token string ("</s>").
    """
    marked, special = set(marked_positions), set(tokenizer.all_special_ids)
    pieces, previous = [], ""
    for index, token in enumerate(token_ids):
        if token in special:
            piece = tokenizer.convert_ids_to_tokens(token) if index in marked else ""
        else:
            current = tokenizer.decode([t for t in token_ids[:index + 1] if t not in special])
            piece = current[len(previous):] if current.startswith(previous) else tokenizer.decode([token])
            previous = current
        if index in marked:
            stripped = piece.lstrip()
            piece = piece[:len(piece) - len(stripped)] + open_mark + stripped + close_mark
        pieces.append(piece)
    return "".join(pieces).strip()


class SelfContrast:
    """Runs Stage 1 on batches of samples with one VLM.

        contrast = SelfContrast(vlm, SelfContrastConfig())
        prepared = contrast.prepare(sample_id, question, answer)
        results = contrast.run([prepared, ...], [pil_image, ...])
    """

    def __init__(self, vlm, config: SelfContrastConfig | None = None):
        self.vlm = vlm
        self.config = config or SelfContrastConfig()
        self.content = ContentTokens(vlm.tokenizer, include_punctuation=self.config.include_punctuation)
        self.special_ids = sorted(set(vlm.tokenizer.all_special_ids))
        self.perturb = None
        if self.config.perturbation != "visual-token":
            check_perturbation(self.config.perturbation, vlm.family,
                               type(vlm.llava.model.vision_tower).__name__)
            self.perturb = ImagePerturbation(vlm, self.config.perturbation, drop_ratio=self.config.drop_ratio,
                                             global_seed=self.config.seed)

    # -- inputs -------------------------------------------------------------------------------------------------------
    def prepare(self, sample_id: str, question: str, answer: str) -> PreparedSample:
        prompt = self.vlm.prompt_tokens(question)
        return PreparedSample(str(sample_id), prompt, self.vlm.answer_tokens(prompt, answer))

    @staticmethod
    def sequence_length(sample: PreparedSample, num_visual_tokens: int) -> int:
        """Tokens of prompt (with every visual token of its image) + answer (EOS included): what must fit the model's
        positions."""
        return sample.prompt.num_text_tokens + num_visual_tokens + len(sample.answer_ids)

    def dropout_for(self, sample_id: str, num_visual_tokens: int) -> VisualDropout:
        config = self.config
        return visual_dropout(num_visual_tokens, config.drop_ratio, global_seed=config.seed, sample_id=sample_id,
                              mode=config.dropout_mode)

    # -- scoring ------------------------------------------------------------------------------------------------------
    @torch.inference_mode()
    def answer_hidden_pairs(self, samples: list[PreparedSample], answers: list[list[int]], visual_tokens,
                            layouts=None, deprived_tokens=None) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(hidden_full [T, D], hidden_drop [T, D]) per sample: the final hidden states predicting each token of
        `answers[i]`, from one packed forward per condition for the whole batch. `deprived_tokens[i]`: the visual
        tokens of an encoder-level perturbation; None: visual-token dropout of `visual_tokens`."""
        full, dropped = [], []
        for index, (sample, answer, visual) in enumerate(zip(samples, answers, visual_tokens)):
            layout = None if layouts is None else layouts[index]
            full.append(ListwiseExample(sample.prompt, [answer], visual, visual_layout=layout))
            if deprived_tokens is not None:
                dropped.append(ListwiseExample(sample.prompt, [answer], deprived_tokens[index]))
                continue
            dropout = self.dropout_for(sample.sample_id, visual.shape[0])
            kept_tokens, attendable = dropout.apply(visual)
            dropped.append(ListwiseExample(sample.prompt, [answer], kept_tokens,
                                           attendable if self.config.dropout_mode == "mask" else None,
                                           visual_layout=dropout.apply_layout(layout)))
        lengths = [len(answer) for answer in answers]
        hidden_full = answer_hidden_states(self.vlm, pack_examples(self.vlm.embed_tokens, full)).split(lengths)
        hidden_drop = answer_hidden_states(self.vlm, pack_examples(self.vlm.embed_tokens, dropped)).split(lengths)
        return list(zip(hidden_full, hidden_drop))

    def _exclusions(self, rows: int, taken: list[list[int]] | None = None) -> torch.Tensor:
        """[rows, E]: the special tokens at every row, then the row's `taken` ids, padded with -1."""
        taken = taken or [[] for _ in range(rows)]
        width = len(self.special_ids) + max((len(ids) for ids in taken), default=0)
        table = torch.full((rows, max(width, 1)), -1, dtype=torch.long)
        for row, ids in enumerate(taken):
            values = self.special_ids + list(ids)
            table[row, :len(values)] = torch.tensor(values, dtype=torch.long)
        return table.to(self.vlm.device)

    @torch.inference_mode()
    def select(self, hidden_full: torch.Tensor, hidden_drop: torch.Tensor, labels: list[int],
               eligible: list[bool], taken: list[list[int]] | None = None):
        """The kernel's selection for one answer, ranking every eligible position above `min_sensitivity` (top_n = T)
        so callers can skip positions without a replacement. `taken[t]`: ids not to choose at row t."""
        from hscr_fast.kernels.contrastive_select import contrastive_select_from_hidden

        config = self.config
        device = hidden_full.device
        rule, alpha_drop = REPLACEMENT_RULES[config.replacement]
        return contrastive_select_from_hidden(
            hidden_full, hidden_drop, self.vlm.lm_head_weight, torch.tensor(labels, dtype=torch.long, device=device),
            beta=config.beta, top_n=len(labels), alpha=config.alpha, alpha_drop=alpha_drop,
            num_candidates=config.num_candidates, sensitivity=config.sensitivity,
            content_mask=torch.tensor(eligible, dtype=torch.bool, device=device), rule=rule,
            exclude=self._exclusions(len(labels), taken), min_sensitivity=config.min_sensitivity,
            backend=config.kernel_backend)

    @staticmethod
    def _ranked(selection, limit: int) -> list[tuple[int, int, float]]:
        """(position, replacement, s_t) of the `limit` most sensitive positions that have a replacement."""
        positions = selection.sensitive_positions.tolist()
        replacements = selection.replacement[selection.sensitive_positions].tolist() if positions else []
        sensitivities = selection.sensitivity[selection.sensitive_positions].tolist() if positions else []
        ranked = [(p, r, s) for p, r, s in zip(positions, replacements, sensitivities) if r >= 0]
        return ranked[:limit]

    def _alternatives(self, hidden_full, hidden_drop, answer: list[int], picks) -> list[tuple[int, ...]]:
        """Per pick, up to `num_alternatives` next-best replacements at its position (best first): the kernel asked
        again on those rows with the better choices excluded."""
        if not picks:
            return []
        positions = [position for position, _, _ in picks]
        taken = [[replacement] for _, replacement, _ in picks]
        rows = torch.tensor(positions, device=hidden_full.device)
        found: list[list[int]] = [[] for _ in picks]
        for _ in range(self.config.num_alternatives):
            selection = self.select(hidden_full[rows], hidden_drop[rows], [answer[p] for p in positions],
                                    [True] * len(positions), taken)
            for index, replacement in enumerate(selection.replacement.tolist()):
                if replacement >= 0:  # -1: this position has no further candidate
                    found[index].append(replacement)
                    taken[index].append(replacement)
        return [tuple(ids) for ids in found]

    # -- the stage ----------------------------------------------------------------------------------------------------
    @torch.inference_mode()
    def run(self, samples: list[PreparedSample], images) -> list[SelfContrastResult]:
        """Stage 1 for a batch. `images`: one per sample, in order, as PIL RGB images or as their pixel values from
        `vlm.preprocess_images` (so a loader thread can prepare the next batch)."""
        if len(samples) != len(images):
            raise ValueError(f"SelfContrast.run: {len(samples)} samples but {len(images)} images")
        if not samples:
            return []
        pixel_values = self.vlm.preprocess_images(list(images)) if isinstance(images, (list, tuple)) else images
        visual_tokens, layouts = self.vlm.encode_images(pixel_values), self.vlm.visual_layouts(pixel_values)
        deprived = None
        if self.perturb is not None:
            deprived = self.perturb(pixel_values, [sample.sample_id for sample in samples])
        answers = [list(sample.answer_ids) for sample in samples]
        content = [self.content.mask(answer) for answer in answers]
        pairs = self.answer_hidden_pairs(samples, answers, visual_tokens, layouts, deprived)
        first_pass = [self._ranked(self.select(h_full, h_drop, answer, mask), self.config.top_n)
                      for (h_full, h_drop), answer, mask in zip(pairs, answers, content)]
        alternatives = [[()] * len(picks) for picks in first_pass]
        for index, ((h_full, h_drop), answer, picks) in enumerate(zip(pairs, answers, first_pass)):
            if len(set(graded_counts(len(picks), self.config.num_variants))) < self.config.num_variants:
                alternatives[index] = self._alternatives(h_full, h_drop, answer, picks)
        if self.config.mode == "parallel":
            chosen = first_pass
        else:
            chosen = self._sequential(samples, answers, content, visual_tokens, layouts, deprived, first_pass)
        return [self._result(sample, picks, dict(zip([p for p, _, _ in first], alternative)), sum(mask))
                for sample, picks, first, alternative, mask in zip(samples, chosen, first_pass, alternatives, content)]

    def _sequential(self, samples, answers, content, visual_tokens, layouts, deprived, first_pass):
        """Eq. 4 literally: one replacement per pass, each pass re-scoring the answer as modified so far."""
        targets = [len(ranked) for ranked in first_pass]  # n per sample, fixed by the pass on y_w
        chosen = [ranked[:1] for ranked in first_pass]
        current = [list(answer) for answer in answers]
        for answer, picks in zip(current, chosen):
            for position, replacement, _ in picks:
                answer[position] = replacement
        while True:
            active = [i for i in range(len(samples)) if len(chosen[i]) < targets[i]]
            if not active:
                return chosen
            pairs = self.answer_hidden_pairs([samples[i] for i in active], [current[i] for i in active],
                                             [visual_tokens[i] for i in active],
                                             None if layouts is None else [layouts[i] for i in active],
                                             None if deprived is None else [deprived[i] for i in active])
            for i, (h_full, h_drop) in zip(active, pairs):
                replaced = {position for position, _, _ in chosen[i]}
                eligible = [ok and position not in replaced for position, ok in enumerate(content[i])]
                ranked = self._ranked(self.select(h_full, h_drop, current[i], eligible), 1)
                if not ranked:  # nothing replaceable is left; this sample stops with fewer replacements
                    targets[i] = len(chosen[i])
                    continue
                position, replacement, sensitivity = ranked[0]
                chosen[i].append((position, replacement, sensitivity))
                current[i][position] = replacement

    def _result(self, sample: PreparedSample, picks: list[tuple[int, int, float]],
                alternatives: dict[int, tuple[int, ...]], num_content: int) -> SelfContrastResult:
        tokenizer = self.vlm.tokenizer
        answer = list(sample.answer_ids)
        sensitive = [SensitiveToken(position, answer[position], replacement, float(sensitivity),
                                    alternatives.get(position, ()))
                     for position, replacement, sensitivity in picks]
        variants = []
        for count in (graded_counts(len(picks), self.config.num_variants) if picks else []):
            token_ids = list(answer)
            for token in sensitive[:count]:
                token_ids[token.position] = token.replacement_id
            variants.append(Variant(token_ids, [token.position for token in sensitive[:count]],
                                    decode_answer(tokenizer, token_ids)))
        # short answers: next-best single swaps, 2nd-best at every position first, until M distinct variants
        distinct = {tuple(variant.token_ids) for variant in variants}
        rank = 1
        while len(distinct) < self.config.num_variants and any(len(t.alternative_ids) >= rank for t in sensitive):
            for token in sensitive:
                if len(token.alternative_ids) < rank or len(distinct) >= self.config.num_variants:
                    continue
                token_ids = list(answer)
                token_ids[token.position] = token.alternative_ids[rank - 1]
                if tuple(token_ids) not in distinct:
                    distinct.add(tuple(token_ids))
                    variants.append(Variant(token_ids, [token.position], decode_answer(tokenizer, token_ids), rank))
            rank += 1
        return SelfContrastResult(sample.sample_id, answer, sensitive, variants, num_content)


def num_distinct(variants: list[Variant]) -> int:
    """How many different token sequences the variants hold (when n < M some variants repeat)."""
    return len({tuple(variant.token_ids) for variant in variants})


__all__ = [
    "CONTRAST_MODES", "REPLACEMENT_RULES", "ContentTokens", "PreparedSample", "SelfContrast", "SelfContrastConfig",
    "SelfContrastResult", "SensitiveToken", "Variant", "decode_answer", "graded_counts", "num_distinct",
    "render_marked",
]
